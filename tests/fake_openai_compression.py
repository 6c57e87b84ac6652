"""A fake OpenAI-compatible HTTP server on loopback: /v1/chat/completions and
/v1/embeddings, enough for the openai client. Deterministic answers, a switch
to fail, and a record of the requests."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

# Words the fake embedding model treats as one meaning (what lexical search misses).
SYNONYMS = {"automobile": "car", "vehicle": "car", "physician": "doctor", "medic": "doctor"}
DIMENSIONS = 256
STOPWORDS = frozenset("a an and do i is it my of on the that to what who you your me".split())


def embed(text: str) -> list[float]:
    """A bag of (synonym-folded) content words hashed into DIMENSIONS buckets."""
    vector = [0.0] * DIMENSIONS
    for word in re.findall(r"[a-z]+", text.lower()):
        if word in STOPWORDS:
            continue
        word = SYNONYMS.get(word, word)
        bucket = int(hashlib.sha1(word.encode()).hexdigest(), 16) % DIMENSIONS
        vector[bucket] += 1.0
    return vector


@dataclass
class FakeOpenAI:
    fail: bool = False
    summary_prefix: str = "LLM SUMMARY"
    # When set, every chat completion answers exactly this (a fixed summary replayed).
    replay_summary: str | None = None
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    _server: asyncio.Server | None = None
    _connections: set[asyncio.Task[Any]] = field(default_factory=set)

    @property
    def base_url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1"

    async def start(self) -> FakeOpenAI:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._connections):
                task.cancel()
            await asyncio.gather(*self._connections, return_exceptions=True)
            await self._server.wait_closed()

    def _answer(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        self.requests.append((path, body))
        if self.fail:
            return 500, {"error": {"message": "the fake is told to fail", "type": "server_error"}}
        if path.endswith("/chat/completions"):
            prompt = body["messages"][-1]["content"]
            seqs = re.findall(r"^#(\d+) ", prompt, flags=re.MULTILINE)
            text = f"{self.summary_prefix} through #{seqs[-1] if seqs else '?'}"
            if self.replay_summary is not None:
                text = self.replay_summary
            return 200, {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": 0,
                "model": body.get("model", "fake"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
        if path.endswith("/embeddings"):
            inputs = body["input"]
            inputs = [inputs] if isinstance(inputs, str) else inputs
            return 200, {
                "object": "list",
                "model": body.get("model", "fake"),
                "data": [
                    {"object": "embedding", "index": i, "embedding": embed(text)}
                    for i, text in enumerate(inputs)
                ],
                "usage": {"prompt_tokens": 1, "total_tokens": 1},
            }
        return 404, {"error": {"message": f"no route {path}"}}

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            while True:
                request_line = await reader.readline()
                if not request_line:
                    return
                _, path, _ = request_line.decode().split(" ", 2)
                length = 0
                while True:
                    line = await reader.readline()
                    if line in (b"\r\n", b"\n", b""):
                        break
                    name, _, value = line.decode().partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value.strip())
                body = json.loads(await reader.readexactly(length)) if length else {}
                status, answer = self._answer(path, body)
                payload = json.dumps(answer).encode()
                reason = "OK" if status == 200 else "Error"
                writer.write(
                    f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(payload)}\r\n\r\n".encode()
                    + payload
                )
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            return
        finally:
            self._connections.discard(task)
            writer.close()

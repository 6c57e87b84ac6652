"""A fake OpenAI-compatible HTTP server on loopback, so tests drive the real
`openai` client and openai-agents' own OpenAI models.

It speaks the Responses API (POST /v1/responses, plain and SSE-streamed),
and Chat Completions (POST /v1/chat/completions, plain), answers from a
script of steps, and records every request and its path. (The compression
tests use tests/fake_openai_compression.py, an asyncio server with
embeddings: under this threaded one their teardown could hang.)
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Step:
    """One model answer: text, or a function call, or an HTTP error; after `delay`."""

    text: str | None = None
    call: tuple[str, dict[str, Any]] | None = None
    status: int = 200
    delay: float = 0.0


@dataclass
class FakeOpenAI:
    steps: list[Step] = field(default_factory=list)
    # Answer when the script is empty.
    default: Step = field(default_factory=lambda: Step(text="default fake reply"))
    # Request bodies, and the path each was posted to.
    requests: list[dict[str, Any]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    base_url: str = ""
    _ids: Iterator[int] = field(default_factory=itertools.count)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def next_step(self, path: str, body: dict[str, Any]) -> tuple[Step, int]:
        with self._lock:
            self.requests.append(body)
            self.paths.append(path)
            step = self.steps.pop(0) if self.steps else self.default
            return step, next(self._ids)

    def bodies(self, path_suffix: str) -> list[dict[str, Any]]:
        """The request bodies posted to paths ending in `path_suffix`."""
        return [
            b for p, b in zip(self.paths, self.requests, strict=True) if p.endswith(path_suffix)
        ]

    @contextmanager
    def serve(self) -> Iterator[str]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                body = json.loads(self.rfile.read(length) or b"{}")
                step, n = fake.next_step(self.path, body)
                if step.delay:
                    time.sleep(step.delay)
                if step.status != 200:
                    self._json(step.status, {"error": {"message": "fake failure", "type": "x"}})
                elif self.path.endswith("/responses/compact"):
                    self._json(200, _compacted(n, body))
                elif self.path.endswith("/chat/completions"):
                    self._json(200, _chat_completion(step, n, body))
                elif body.get("stream"):
                    self._stream(_response(step, n, body))
                else:
                    self._json(200, _response(step, n, body))

            def _json(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _stream(self, response: dict[str, Any]) -> None:
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.end_headers()
                for event in _stream_events(response):
                    self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                    self.wfile.flush()
                self.wfile.write(b"data: [DONE]\n\n")

        server = _QuietServer(("127.0.0.1", 0), Handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            self.base_url = f"http://127.0.0.1:{server.server_address[1]}/v1"
            yield self.base_url
        finally:
            server.shutdown()
            server.server_close()


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Callers that time out or die hang up mid-answer; that is the point
        # of the tests that do it.
        pass


USAGE = {
    "input_tokens": 11,
    "output_tokens": 7,
    "total_tokens": 18,
    "input_tokens_details": {"cached_tokens": 0},
    "output_tokens_details": {"reasoning_tokens": 0},
}


def _output(step: Step, n: int) -> list[dict[str, Any]]:
    if step.call is not None:
        name, arguments = step.call
        return [
            {
                "type": "function_call",
                "id": f"fc_{n}",
                "call_id": f"call_{n}",
                "name": name,
                "arguments": json.dumps(arguments),
                "status": "completed",
            }
        ]
    return [
        {
            "type": "message",
            "id": f"msg_{n}",
            "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": step.text or "", "annotations": []}],
        }
    ]


def _response(step: Step, n: int, body: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": f"resp_{n}",
        "object": "response",
        "created_at": 0,
        "model": body.get("model", "fake"),
        "status": "completed",
        "output": _output(step, n),
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": USAGE,
    }


def _stream_events(response: dict[str, Any]) -> Iterator[dict[str, Any]]:
    sequence = itertools.count()
    yield {
        "type": "response.created",
        "sequence_number": next(sequence),
        "response": {**response, "status": "in_progress", "output": []},
    }
    for index, item in enumerate(response["output"]):
        yield {
            "type": "response.output_item.added",
            "sequence_number": next(sequence),
            "output_index": index,
            "item": {
                **item,
                "status": "in_progress",
                **({"content": []} if "content" in item else {}),
            },
        }
        if item["type"] == "message":
            words = item["content"][0]["text"].split(" ")
            for position, word in enumerate(words):
                yield {
                    "type": "response.output_text.delta",
                    "sequence_number": next(sequence),
                    "item_id": item["id"],
                    "output_index": index,
                    "content_index": 0,
                    "delta": word if position == len(words) - 1 else word + " ",
                    "logprobs": [],
                }
        yield {
            "type": "response.output_item.done",
            "sequence_number": next(sequence),
            "output_index": index,
            "item": item,
        }
    yield {"type": "response.completed", "sequence_number": next(sequence), "response": response}


def _chat_completion(step: Step, n: int, body: dict[str, Any]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": step.text}
    if step.call is not None:
        name, arguments = step.call
        message = {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": f"call_{n}",
                    "type": "function",
                    "function": {"name": name, "arguments": json.dumps(arguments)},
                }
            ],
        }
    return {
        "id": f"chatcmpl_{n}",
        "object": "chat.completion",
        "created": 0,
        "model": body.get("model", "fake"),
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": "tool_calls" if step.call else "stop",
            }
        ],
        "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
    }


def _compacted(n: int, body: dict[str, Any]) -> dict[str, Any]:
    """A responses.compact answer shaped like OpenAI's: the input's user
    messages, then one compaction item whose content names how many items it
    replaced (so tests can tell what was compacted)."""
    items = body.get("input") or []
    users = [
        {
            "type": "message",
            "role": "user",
            "id": f"msg_c{n}_{i}",
            "status": "completed",
            "content": [{"type": "input_text", "text": _text_of(item)}],
        }
        for i, item in enumerate(items)
        if isinstance(item, dict) and item.get("role") == "user"
    ]
    compaction = {
        "type": "compaction",
        "id": f"cmp_{n}",
        "encrypted_content": f"compacted {len(items)} items",
    }
    return {
        "id": f"resp_compact_{n}",
        "created_at": 0,
        "object": "response.compaction",
        "output": [*users, compaction],
        "usage": USAGE,
    }


def _text_of(item: dict[str, Any]) -> str:
    content = item.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""

"""Exact token counts offline: the encoding file ships with a dependency, is
checked against tiktoken's hash, and what is counted is what the model reads."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pytest

from state_service import tokens
from state_service.tokens import (
    PER_ITEM_OVERHEAD_TOKENS,
    EstimatingTokenCounter,
    TiktokenCounter,
    make_token_counter,
    sent_text,
    tiktoken_cache_file,
)


@pytest.fixture
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("encoding", ["o200k_base", "cl100k_base"])
def test_auto_is_exact_offline_from_the_bundled_file(empty_cache: Path, encoding: str) -> None:
    counter = make_token_counter("auto", encoding)
    assert isinstance(counter, TiktokenCounter)
    cached = tiktoken_cache_file(encoding)
    assert cached is not None and cached.parent == empty_cache
    # The file tiktoken loads is the one it would have downloaded.
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == tokens._ENCODING_SHA256[encoding]
    assert counter.count_text("hello world") == 2


def test_counts_the_text_sent_not_the_json(empty_cache: Path) -> None:
    counter = make_token_counter("tiktoken")
    assert isinstance(counter, TiktokenCounter)
    message = json.dumps({"role": "user", "content": "The quick brown fox jumps over the dog."})
    assert sent_text(message.encode()) == "The quick brown fox jumps over the dog."
    exact = counter.count(message.encode())
    assert exact == counter.count_text("The quick brown fox jumps over the dog.") + 4
    # The estimate (bytes / 3 of the JSON) errs high, by a lot on English.
    assert EstimatingTokenCounter().count(message.encode()) > 1.5 * exact


def test_what_is_counted_per_item_kind() -> None:
    parts = {"role": "assistant", "content": [{"type": "output_text", "text": "Hi there"}]}
    assert sent_text(json.dumps(parts).encode()) == "Hi there"
    call = {"type": "function_call", "call_id": "c1", "name": "lookup", "arguments": '{"q":1}'}
    assert sent_text(json.dumps(call).encode()) == 'lookup({"q":1})'
    output = {"type": "function_call_output", "call_id": "c1", "output": "42 items"}
    assert sent_text(json.dumps(output).encode()) == "42 items"
    # Shapes not known here are counted as their JSON: an over-count, never under.
    unknown = json.dumps({"type": "image_generation", "result": "xyz"})
    assert sent_text(unknown.encode()) == unknown
    assert sent_text(b"#3 user: plain summary text") == "#3 user: plain summary text"
    assert sent_text(b"{not json") == "{not json"


def test_empty_message_costs_its_framing(empty_cache: Path) -> None:
    counter = make_token_counter("tiktoken")
    assert counter.count(b'{"role":"user","content":""}') == PER_ITEM_OVERHEAD_TOKENS


def test_a_bundled_file_with_the_wrong_hash_is_not_used(
    empty_cache: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = tmp_path_factory.mktemp("bundled") / "o200k_base.tiktoken.gz"
    bad.write_bytes(gzip.compress(b"aGVsbG8= 0\n"))
    monkeypatch.setattr(tokens, "bundled_encoding_file", lambda encoding: bad)
    assert isinstance(make_token_counter("auto"), EstimatingTokenCounter)
    cached = tiktoken_cache_file("o200k_base")
    assert cached is not None and not cached.exists()
    with pytest.raises(RuntimeError):
        make_token_counter("tiktoken")


def test_an_unwritable_cache_falls_back_to_the_estimate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(blocker / "cache"))
    assert isinstance(make_token_counter("auto"), EstimatingTokenCounter)


def test_without_the_bundled_package_auto_estimates(
    empty_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tokens, "BUNDLED_ENCODINGS_PACKAGE", "no_such_package_here")
    assert isinstance(make_token_counter("auto"), EstimatingTokenCounter)
    assert make_token_counter("estimate").name == "estimate"

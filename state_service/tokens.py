"""Token counting for context budgets.

Exact where possible: with `tiktoken` and its encoding file available offline
(tiktoken's cache, TIKTOKEN_CACHE_DIR, holds it), the counter is the
encoding's token count of the item's JSON plus a per-item overhead for the
message framing. tiktoken downloads encoding files on first use, which this
service never triggers: without the file it uses the estimate below.

The estimate is calibrated to err high: ceil(UTF-8 bytes / 3) of the item's
JSON plus the per-item overhead. o200k/cl100k average about four bytes of
English per token and JSON punctuation costs about one, so dividing by three
over-counts typical items by 20-35 %; CJK text (three bytes per character,
about one token each) lands close to exact. Budgets are applied to the
count, so the count reported is never above the budget.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Protocol

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


class TokenCounter(Protocol):
    name: str

    def count(self, item_json: bytes) -> int: ...


class EstimatingTokenCounter:
    name = "estimate"

    def count(self, item_json: bytes) -> int:
        return -(-len(item_json) // 3) + PER_ITEM_OVERHEAD_TOKENS


class TiktokenCounter:
    """Exact token counts of a tiktoken encoding (plus the per-item overhead)."""

    name = "tiktoken"

    def __init__(self, encoding: Any) -> None:
        self._encoding = encoding

    def count(self, item_json: bytes) -> int:
        text = item_json.decode("utf-8", errors="replace")
        return len(self._encoding.encode(text, disallowed_special=())) + PER_ITEM_OVERHEAD_TOKENS


def tiktoken_cache_file(encoding: str) -> Path | None:
    """Where tiktoken's cache keeps `encoding`, or None for an unknown name."""
    url = _ENCODING_URLS.get(encoding)
    if url is None:
        return None
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    if not cache_dir:
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    return Path(cache_dir) / hashlib.sha1(url.encode()).hexdigest()


def load_tiktoken(encoding: str) -> TiktokenCounter | None:
    """A tiktoken counter if the encoding is available offline, else None
    (never downloads)."""
    cached = tiktoken_cache_file(encoding)
    if cached is None or not cached.is_file():
        return None
    try:
        import tiktoken

        return TiktokenCounter(tiktoken.get_encoding(encoding))
    except Exception:  # a corrupt cache file would make tiktoken try to download
        logger.warning("tiktoken encoding %s unusable; estimating tokens", encoding)
        return None


def make_token_counter(mode: str, encoding: str = "o200k_base") -> TokenCounter:
    """mode: "auto" (tiktoken if available offline, else estimate), "estimate",
    or "tiktoken" (fails if unavailable)."""
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

"""Importing items that keep their seqs and create times (ImportItems).

An export (this or another statecar) or history converted from another store
arrives with seqs already given; appending would renumber them, so imports
are their own atomic step (storage ``import_entries``) that writes the seqs as
given, only above the session's last seq: an import never interleaves with or
overwrites what a session has. Resuming or repeating an import is the
importer's part: it skips the items the session has after checking them
(client/portability.py), and its request ids replay retried calls.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from shared_runtime.errors import InvalidArgument
from state_service import log, metrics
from state_service.compression.engine import Compression
from state_service.encryption import KeyRing
from state_service.heavy_work import HeavyWork
from state_service.log import NewItem
from state_service.storage.redis import AppendOutcome, RedisStorage
from state_service.tokens import TokenCounter
from state_service.validation import MAX_CLOCK_SKEW_MS, now_ms


@dataclass(frozen=True, slots=True)
class ImportedItem:
    """An item with the seq it keeps and its create time (0: now)."""

    seq: int
    create_ms: int
    item: NewItem


def check_order(items: Sequence[ImportedItem], now: int) -> None:
    """Seqs positive and increasing; create times not before 1970 nor in the
    future (beyond clock skew). The items themselves are validated as for
    AppendItems by the caller."""
    previous = 0
    for i, imported in enumerate(items):
        if imported.seq <= previous:
            raise InvalidArgument(
                f"items[{i}].seq",
                "must be positive and above the previous item's seq" if i else "must be positive",
            )
        previous = imported.seq
        if imported.create_ms < 0:
            raise InvalidArgument(f"items[{i}].create_time", "must be after 1970-01-01T00:00:00Z")
        if imported.create_ms > now + MAX_CLOCK_SKEW_MS:
            raise InvalidArgument(f"items[{i}].create_time", "is in the future")


class SessionImports:
    def __init__(
        self,
        storage: RedisStorage,
        *,
        token_counter: TokenCounter,
        keys: KeyRing | None = None,
        compression: Compression | None = None,
        heavy: HeavyWork | None = None,
    ) -> None:
        self._storage = storage
        self._heavy = heavy or HeavyWork.unlimited()
        self._tokens = token_counter
        self._keys = keys
        self._compression = compression

    async def import_items(
        self,
        tenant: str,
        session_id: str,
        items: Sequence[ImportedItem],
        *,
        request_id: str,
        etag: str,
    ) -> AppendOutcome:
        now = now_ms()
        check_order(items, now)

        def encode() -> tuple[list[bytes], int]:
            entries: list[bytes] = []
            for imported in items:
                payload = log.encode(imported.item, imported.create_ms or now)
                if self._keys is not None:
                    payload = self._keys.seal(tenant, session_id, payload)
                entries.append(b"%d:%s" % (imported.seq, payload))
            return entries, sum(self._tokens.count(i.item.json) for i in items)

        # As for appends: a large import encodes and counts off the event loop.
        size = sum(len(i.item.json) for i in items)
        entries, tokens = await self._heavy.write_work(tenant, size, encode)
        outcome = await self._storage.import_entries(
            tenant,
            session_id,
            entries,
            first_seq=items[0].seq if items else 0,
            last_seq=items[-1].seq if items else 0,
            request_id=request_id,
            expected_etag=etag,
            new_incarnation=uuid.uuid4().hex[:16],
            now_ms=now,
            tokens=tokens,
        )
        if outcome.replayed:
            metrics.IDEMPOTENT_REPLAYS.labels("import").inc()
        elif outcome.last_seq:
            metrics.ITEMS_IMPORTED.inc(len(items))
            compression = self._compression
            if compression is not None and compression.compressor is not None:
                compression.compressor.appended(
                    tenant, session_id, last_seq=outcome.last_seq, log_tokens=outcome.log_tokens
                )
        return outcome

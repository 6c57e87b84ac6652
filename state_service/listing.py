"""Listing a session's items and a tenant's sessions, page by page.

Page tokens (paging.py) are bound to the request that issued them and, for
items, to the session's incarnation: a token outlives appends (pages are log
indexes, which appends never move) but not a delete. The first newest-first
page is served from the cached tail when it holds enough.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from state_service import metrics, paging
from state_service.errors import InvalidField
from state_service.heavy_work import HeavyWork, Offload
from state_service.log import Item, LogEntry
from state_service.reader import LogReader
from state_service.sessions import SessionInfo, session_info
from state_service.storage.redis import ABSENT_ETAG, RedisStorage, SessionHead


@dataclass(frozen=True, slots=True)
class ItemsPage:
    items: Sequence[Item]
    etag: str = ABSENT_ETAG
    next_page_token: str = ""
    total_item_count: int = 0


@dataclass(frozen=True, slots=True)
class SessionsPage:
    sessions: Sequence[SessionInfo]
    next_page_token: str


class Listing:
    def __init__(self, storage: RedisStorage, reader: LogReader, heavy: HeavyWork) -> None:
        self._storage = storage
        self._reader = reader
        self._heavy = heavy

    async def list_items(
        self,
        tenant: str,
        session_id: str,
        *,
        page_size: int,
        page_token: str,
        newest_first: bool,
    ) -> ItemsPage:
        """A page of the log. Decoding a page of large items is heavy work: it
        takes one of the tenant's slots (heavy_work.py)."""
        async with self._heavy.share(tenant) as share:
            return await self._list_items(
                share.run, tenant, session_id, page_size, page_token, newest_first
            )

    async def _list_items(
        self,
        offload: Offload,
        tenant: str,
        session_id: str,
        page_size: int,
        page_token: str,
        newest_first: bool,
    ) -> ItemsPage:
        order = "newest" if newest_first else "oldest"
        start_at: int | None = None
        incarnation: str | None = None
        if page_token:
            fields = paging.decode(page_token, {"s": session_id, "o": order})
            start_at = paging.int_field(fields, "i")
            incarnation = str(fields.get("inc", ""))
        # The first page of newest-first is the cached tail's business.
        if newest_first and start_at is None and page_size <= self._reader.cache_window:
            tail = await self._reader.current_tail(tenant, session_id, page_size, offload)
            if tail is None:
                return ItemsPage(())
            if len(tail.entries) >= page_size or tail.start_index == 0:
                page = tail.entries[-page_size:]
                first_index = tail.head.item_count - len(page)
                return _items_page(session_id, order, tail.head, page, first_index - 1)
        if start_at == -1:
            return ItemsPage(())
        if newest_first:
            index_range = (
                (-page_size, -1)
                if start_at is None
                else (max(0, start_at - page_size + 1), start_at)
            )
        else:
            begin = start_at or 0
            index_range = (begin, begin + page_size - 1)
        result = await self._storage.read(
            tenant, session_id, index_range=index_range, newest_first=newest_first
        )
        head = result.head
        if head is None:
            if incarnation:
                raise InvalidField("page_token", "the session was deleted since")
            return ItemsPage(())
        if incarnation and incarnation != head.incarnation:
            raise InvalidField("page_token", "the session was deleted since")
        entries = await self._reader.decoded(tenant, session_id, result.entries, offload)
        # A read step may return less than the page (its byte bound): newest
        # first keeps the range's newest entries, oldest first its oldest.
        if newest_first:
            last_index = (
                head.item_count - 1 if start_at is None else min(start_at, head.item_count - 1)
            )
            return _items_page(session_id, order, head, entries, last_index - len(entries))
        next_index = index_range[0] + len(entries)
        more = next_index < head.item_count and bool(entries)
        return _items_page(session_id, order, head, entries, next_index if more else None)

    async def list_sessions(self, tenant: str, *, page_size: int, page_token: str) -> SessionsPage:
        after = ""
        if page_token:
            fields = paging.decode(page_token, {"k": "sessions"})
            after = str(fields.get("a", ""))
        sessions: list[SessionInfo] = []
        exhausted = False
        for _ in range(8):
            want = page_size - len(sessions)
            ids = await self._storage.index_page(tenant, after, want)
            # Sessions only the durable tier has (none without it), merged in
            # id order: the page is the first `want` ids of both.
            archived = dict(await self._storage.archived_page(tenant, after, want))
            every = sorted(set(ids) | archived.keys())
            page = every[:want]
            exhausted = len(ids) < want and len(archived) < want and len(every) <= want
            in_redis = set(ids)
            hot = [sid for sid in page if sid in in_redis]
            heads = dict(zip(hot, await prune_gone(self._storage, tenant, hot), strict=True))
            for sid in page:
                head = heads.get(sid) or archived.get(sid)
                if head is not None:
                    sessions.append(session_info(sid, head, self._storage.default_ttl_seconds))
            if page:
                after = page[-1]
            if exhausted or len(sessions) >= page_size:
                break
        token = "" if exhausted else paging.encode({"k": "sessions", "a": after})
        return SessionsPage(sessions, token)


async def prune_gone(
    storage: RedisStorage, tenant: str, session_ids: Sequence[str]
) -> list[SessionHead | None]:
    """The heads of the tenant's `session_ids`, after removing from its index
    those whose session is gone (Redis expired its keys): as ListSessions
    meets them, and as the background sweep (index_sweep.py) does."""
    heads = await storage.heads(tenant, session_ids)
    gone = [sid for sid, head in zip(session_ids, heads, strict=True) if head is None]
    if gone:
        await storage.index_remove(tenant, gone)
        metrics.SESSIONS_EXPIRED.inc(len(gone))
    return heads


def _items_page(
    session_id: str,
    order: str,
    head: SessionHead,
    entries: Sequence[LogEntry],
    next_index: int | None,
) -> ItemsPage:
    items = [e.item for e in entries]
    if order == "newest":
        items.reverse()
        if next_index is not None and next_index < 0:
            next_index = None
    token = ""
    if next_index is not None:
        token = paging.encode(
            {"s": session_id, "o": order, "i": next_index, "inc": head.incarnation}
        )
    return ItemsPage(items, head.etag, token, head.item_count)

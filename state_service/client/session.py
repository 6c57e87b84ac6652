"""StateServiceSession: an openai-agents `Session` backed by the state service,
a drop-in replacement for openai-agents' RedisSession in
`Runner.run(agent, input, session=...)`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from agents.items import TResponseInputItem
from agents.memory.session_settings import SessionSettings, resolve_session_limit

from state_service.client._client import StateClient


class StateServiceSession:
    """The conversation history of one session, kept by the state service.

    Give it either a `client` (shared, not closed here) or a `target` (a client
    of its own, closed by `close()`).
    """

    def __init__(
        self,
        session_id: str,
        *,
        target: str | Sequence[str] | None = None,
        client: StateClient | None = None,
        session_settings: SessionSettings | None = None,
    ) -> None:
        if (client is None) == (target is None):
            raise ValueError("give exactly one of target or client")
        self.session_id = session_id
        self.session_settings = session_settings
        self._owns_client = client is None
        self._client = client if client is not None else StateClient(cast(str, target))

    async def get_items(self, limit: int | None = None) -> list[TResponseInputItem]:
        """The newest `limit` items (all when None), oldest first."""
        limit = resolve_session_limit(limit, self.session_settings)
        if limit is None:
            items = await self._client.all_items(self.session_id)
            return [cast(TResponseInputItem, item.data) for item in items]
        if limit <= 0:
            return []
        collected: list[dict[str, Any]] = []
        token = ""
        while len(collected) < limit:
            page = await self._client.list_items(
                self.session_id,
                page_size=min(limit - len(collected), 1000),
                page_token=token,
                newest_first=True,
            )
            collected.extend(item.data for item in page.items)
            token = page.next_page_token
            if not token:
                break
        collected.reverse()
        return [cast(TResponseInputItem, item) for item in collected]

    async def add_items(self, items: list[TResponseInputItem]) -> None:
        if items:
            await self._client.append_items(
                self.session_id, [cast(dict[str, Any], item) for item in items]
            )

    async def pop_item(self) -> TResponseInputItem | None:
        result = await self._client.pop_item(self.session_id)
        return cast(TResponseInputItem, result.item.data) if result.item is not None else None

    async def clear_session(self) -> None:
        await self._client.delete_session(self.session_id, allow_missing=True)

    async def close(self) -> None:
        if self._owns_client:
            await self._client.close()

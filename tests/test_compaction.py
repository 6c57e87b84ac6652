"""Compaction as a view: CompactSession / GetCompactedView against a real state
server (one redis-server and a Redis Cluster), and openai-agents'
OpenAIResponsesCompactionSession over StateServiceSession, with a fake
OpenAI-compatible endpoint on loopback (the only fake: the model)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import redis
from agents import Agent, Runner
from agents.items import TResponseInputItem
from agents.memory.openai_responses_compaction_session import OpenAIResponsesCompactionSession
from agents.models.openai_responses import OpenAIResponsesModel
from openai import AsyncOpenAI
from redis.cluster import RedisCluster

from state_service.client import (
    EtagMismatchError,
    InvalidRequestError,
    SessionNotFoundError,
    StateClient,
    StateServiceSession,
)
from tests.conftest import StateServerFactory
from tests.fake_openai import FakeOpenAI, Step


@pytest.fixture(params=["single", "cluster"])
def redis_backend(request: pytest.FixtureRequest) -> str:
    """Every test here runs on one redis-server and on a Redis Cluster."""
    return str(request.param)


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    model = FakeOpenAI(default=Step(text="fake answer"))
    with model.serve():
        yield model


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


COMPACTION = {"type": "compaction", "id": "cmp_1", "encrypted_content": "opaque"}
# The same, typed as the SDK's input item.
COMPACTION_ITEM = cast(TResponseInputItem, COMPACTION)


async def test_a_view_stands_in_for_the_log_which_stays_whole(client: StateClient) -> None:
    await client.append_items("s", [user("a"), assistant("b"), user("c"), assistant("d")])
    assert not (await client.get_compacted_view("s")).compacted
    head = await client.get_session("s")

    result = await client.compact_session("s", [user("a"), COMPACTION], etag=head.etag)
    assert (result.view_item_count, result.compacted_up_to_seq) == (2, 4)
    assert result.etag != head.etag
    await client.append_items("s", [user("e")])

    view = await client.get_compacted_view("s")
    assert view.compacted
    assert [i.data for i in view.items] == [user("a"), COMPACTION, user("e")]
    assert [i.seq for i in view.items] == [0, 0, 5]
    assert view.total_item_count == 3
    assert [i.data for i in (await client.get_compacted_view("s", max_items=2)).items] == [
        COMPACTION,
        user("e"),
    ]
    # The log keeps every item; GetContext and ListItems read it.
    assert [i.seq for i in await client.all_items("s")] == [1, 2, 3, 4, 5]


async def test_compaction_is_etag_checked_and_idempotent(client: StateClient) -> None:
    first = await client.append_items("s", [user("a"), assistant("b")])
    await client.append_items("s", [user("c")])
    with pytest.raises(EtagMismatchError):
        await client.compact_session("s", [COMPACTION], etag=first.etag)
    assert not (await client.get_compacted_view("s")).compacted  # nothing written
    etag = (await client.get_session("s")).etag
    done = await client.compact_session("s", [COMPACTION], etag=etag, request_id="c1")
    again = await client.compact_session("s", [COMPACTION], etag=etag, request_id="c1")
    assert again.replayed
    assert (again.etag, again.view_item_count) == (done.etag, 1)


async def test_keep_items_carries_part_of_the_view_over(client: StateClient) -> None:
    await client.append_items("s", [user("a"), assistant("b"), user("c"), assistant("d")])
    etag = (await client.get_session("s")).etag
    # No view yet: the view is the log; keep its first two items.
    kept = await client.compact_session("s", [COMPACTION], etag=etag, keep_items=2)
    assert kept.view_item_count == 3
    await client.append_items("s", [user("e"), assistant("f")])
    view = await client.get_compacted_view("s")
    assert [i.data for i in view.items] == [
        user("a"),
        assistant("b"),
        COMPACTION,
        user("e"),
        assistant("f"),
    ]
    # A later compaction keeps a prefix of the current view (stored and log items).
    again = await client.compact_session("s", [user("z")], etag=view.etag, keep_items=4)
    assert again.view_item_count == 5
    assert [i.data for i in (await client.get_compacted_view("s")).items] == [
        user("a"),
        assistant("b"),
        COMPACTION,
        user("e"),
        user("z"),
    ]
    with pytest.raises(InvalidRequestError) as invalid:
        await client.compact_session("s", [], etag=again.etag, keep_items=99)
    assert invalid.value.metadata["field"] == "keep_items"


async def test_a_pop_of_a_covered_item_drops_the_view_not_the_log(client: StateClient) -> None:
    await client.append_items("s", [user("a"), assistant("b")])
    etag = (await client.get_session("s")).etag
    await client.compact_session("s", [COMPACTION], etag=etag)
    await client.append_items("s", [user("c")])
    await client.pop_item("s")  # seq 3: after the view, which stays
    assert (await client.get_compacted_view("s")).compacted
    await client.pop_item("s")  # seq 2: covered by the view, which no longer describes the log
    assert not (await client.get_compacted_view("s")).compacted
    assert [i.data for i in await client.all_items("s")] == [user("a")]


async def test_errors(client: StateClient) -> None:
    with pytest.raises(SessionNotFoundError):
        await client.compact_session("nope", [COMPACTION], etag="0")
    await client.append_items("s", [user("a")])
    with pytest.raises(InvalidRequestError) as invalid:
        await client.compact_session("s", [COMPACTION], etag="")
    assert invalid.value.metadata["field"] == "etag"
    etag = (await client.get_session("s")).etag
    with pytest.raises(InvalidRequestError) as invalid:
        await client.compact_session("s", [{"type": "nonsense"}], etag=etag)
    assert invalid.value.metadata["field"] == "items[0].json"
    assert (await client.get_compacted_view("missing")).etag == "0"


# -- the SDK's compaction session over StateServiceSession ----------------------


class RecordingSession(StateServiceSession):
    """StateServiceSession that records which replacement path the SDK took
    and refuses the destructive one."""

    def __init__(self, session_id: str, client: StateClient) -> None:
        super().__init__(session_id, client=client)
        self.snapshot_replacements: list[int] = []
        self.whole_replacements = 0

    async def clear_session(self) -> None:
        raise AssertionError("the SDK fell back to clear_session + add_items")

    async def _get_compaction_snapshot(self, limit: int) -> Any:
        snapshot = await super()._get_compaction_snapshot(limit)
        if snapshot is None:
            return None
        replace = snapshot.replace_suffix

        async def recorded(start: int, output: list[Any]) -> bool:
            self.snapshot_replacements.append(start)
            return await replace(start, output)

        return type(snapshot)(snapshot.items, snapshot.complete, recorded)

    async def _atomic_replace_items(self, items: list[Any]) -> bool:
        self.whole_replacements += 1
        return await super()._atomic_replace_items(items)


def _agent(fake: FakeOpenAI) -> tuple[Agent[Any], AsyncOpenAI]:
    openai_client = AsyncOpenAI(base_url=fake.base_url, api_key="test", max_retries=0)
    model = OpenAIResponsesModel(model="gpt-4.1", openai_client=openai_client)
    return Agent(name="a", instructions="be brief", model=model), openai_client


async def test_sdk_compaction_session_replaces_history_atomically(
    client: StateClient, fake: FakeOpenAI
) -> None:
    agent, openai_client = _agent(fake)
    underlying = RecordingSession("s", client)
    session = OpenAIResponsesCompactionSession(
        "s",
        underlying,
        client=openai_client,
        model="gpt-4.1",
        should_trigger_compaction=lambda context: len(context["session_items"]) >= 6,
    )
    for n in range(4):
        await Runner.run(agent, f"question {n}", session=session)

    compactions = fake.bodies("/responses/compact")
    assert compactions, "the SDK never called responses.compact"
    assert underlying.snapshot_replacements  # the automatic path: an etag-checked suffix
    view = await client.get_compacted_view("s")
    assert view.compacted
    assert any(i.data.get("type") == "compaction" for i in view.items)
    # The log kept every turn: nothing was cleared.
    log = await client.all_items("s")
    assert [i.data.get("content") for i in log if i.data.get("role") == "user"] == [
        f"question {n}" for n in range(4)
    ]
    # What the SDK reads back (and sends the model next) is the view.
    assert await session.get_items() == [i.data for i in view.items]
    await Runner.run(agent, "question 4", session=session)
    sent = fake.bodies("/responses")[-1]["input"]
    assert any(isinstance(i, dict) and i.get("type") == "compaction" for i in sent)


async def test_sdk_manual_compaction_uses_the_atomic_replace(
    client: StateClient, fake: FakeOpenAI
) -> None:
    agent, openai_client = _agent(fake)
    underlying = RecordingSession("s", client)
    session = OpenAIResponsesCompactionSession(
        "s",
        underlying,
        client=openai_client,
        model="gpt-4.1",
        should_trigger_compaction=lambda context: False,
    )
    for n in range(3):
        await Runner.run(agent, f"question {n}", session=session)
    before = await client.all_items("s")
    await session.run_compaction({"force": True, "compaction_mode": "input"})
    view = await client.get_compacted_view("s")
    assert view.compacted
    assert view.items[-1].data["type"] == "compaction"
    assert view.items[-1].data["encrypted_content"] == f"compacted {len(before)} items"
    assert await client.all_items("s") == before  # the log is untouched
    assert underlying.whole_replacements == 1


async def test_a_snapshot_replacement_after_a_concurrent_write_is_refused(
    client: StateClient,
) -> None:
    await client.append_items("s", [user("a"), assistant("b"), user("c"), assistant("d")])
    session = StateServiceSession("s", client=client)
    snapshot = await session._get_compaction_snapshot(3)
    assert snapshot is not None
    assert (snapshot.items, snapshot.complete) == (
        [assistant("b"), user("c"), assistant("d")],
        False,
    )
    await client.append_items("s", [user("meanwhile")])
    assert not await snapshot.replace_suffix(1, [COMPACTION_ITEM])
    assert not (await client.get_compacted_view("s")).compacted
    fresh = await session._get_compaction_snapshot(3)
    assert fresh is not None
    assert await fresh.replace_suffix(1, [COMPACTION_ITEM])
    # Items before the snapshot's suffix are kept, in order.
    assert await session.get_items() == [user("a"), assistant("b"), user("c"), COMPACTION]


async def test_a_budgeted_session_compacts_its_log_not_its_budgeted_view(
    client: StateClient,
) -> None:
    for n in range(40):
        await client.append_items("s", [user(f"question {n} " * 20), assistant(f"answer {n}")])
    session = StateServiceSession("s", client=client, token_budget=300)
    budgeted = await session.get_items()
    raw, complete = await session._read_compaction_items(None)
    assert complete
    assert len(raw) == 80 > len(budgeted)
    assert raw == [i.data for i in await client.all_items("s")]


async def test_views_are_sealed_like_the_log(
    state_server_factory: StateServerFactory, tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    keys.write_text("*:k1:" + "B" * 43 + "=\n")
    server = await state_server_factory(encryption_keys_file=keys)
    async with StateClient(server.address) as client:
        await client.append_items("s", [user("secret a"), assistant("b")])
        etag = (await client.get_session("s")).etag
        await client.compact_session("s", [user("secret summary")], etag=etag, keep_items=1)
        view = await client.get_compacted_view("s")
        assert [i.data for i in view.items] == [user("secret a"), user("secret summary")]
        url = server.settings.redis_url
        raw: Any = (
            RedisCluster.from_url(url)
            if server.settings.redis_cluster
            else redis.Redis.from_url(url)
        )
        try:
            scan = (
                raw.scan_iter(match="*", target_nodes=RedisCluster.PRIMARIES)
                if server.settings.redis_cluster
                else raw.scan_iter(match="*")
            )
            hashes = [raw.hgetall(key) for key in scan if raw.type(key) == b"hash"]
        finally:
            raw.close()
        assert any(b"vitems" in fields for fields in hashes)  # the view was among them
        assert not any(b"secret" in value for fields in hashes for value in fields.values())

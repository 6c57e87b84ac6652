"""The client's cheaper paths keep their meaning: StoredItem's times decoded
only when read equal Timestamp.ToDatetime's, the item stays immutable and
compared by value, and a StateServiceSession keeping a copy of the log still
sees every write made through another connection between turns. (Timings are
bench/session_cost.py's; these check the behaviour.)"""

from __future__ import annotations

import copy
import json
import pickle
from dataclasses import FrozenInstanceError
from datetime import datetime
from typing import Any

import pytest
from agents import Agent, RunConfig, Runner

from agent_service.models.offline import OfflineModel
from state_service.client import StateClient, StateServiceSession
from state_service.client.types import StoredItem
from state_service.server import StateServer
from statecar.state.v1 import state_service_pb2 as pb


def _message(n: int) -> Any:
    return {"role": "user" if n % 2 else "assistant", "content": f"message {n}"}


def test_times_decoded_when_read_equal_the_timestamps() -> None:
    said = datetime(1999, 12, 31, 23, 59, 58, 123456)
    items = [pb.Item(seq=n + 1, json=json.dumps(_message(n)), speaker="Mel") for n in range(3)]
    items[0].create_time.GetCurrentTime()
    items[1].create_time.FromNanoseconds(1_700_000_000_123_456_789)
    items[1].original_time.FromDatetime(said)
    stored = StoredItem.all_from_proto(items)
    for item, message in zip(stored, items, strict=True):
        assert item.create_time == (
            message.create_time.ToDatetime() if message.HasField("create_time") else None
        )
    assert stored[1].original_time == said
    assert stored[0].original_time is None
    assert stored[2].create_time is None
    assert stored[1] == StoredItem.from_proto(items[1])
    assert (stored[1].seq, stored[1].data, stored[1].speaker) == (2, _message(1), "Mel")
    assert stored[1].raw_json == items[1].json


def test_a_stored_item_is_an_immutable_value() -> None:
    created = datetime(2024, 5, 1, 12, 0, 0)
    item = StoredItem(seq=3, data={"role": "user"}, metadata={"k": "v"}, create_time=created)
    same = StoredItem(3, {"role": "user"}, {"k": "v"}, created, None, "", raw_json='{"x":1}')
    assert item == same  # raw_json is not compared
    assert item != StoredItem(4, {"role": "user"}, {"k": "v"}, created)
    assert item != "not an item"
    assert repr(item) == (
        "StoredItem(seq=3, data={'role': 'user'}, metadata={'k': 'v'}, "
        "create_time=datetime.datetime(2024, 5, 1, 12, 0), original_time=None, speaker='')"
    )
    with pytest.raises(FrozenInstanceError):
        item.seq = 4
    with pytest.raises(FrozenInstanceError):
        del item.data
    with pytest.raises(TypeError):
        hash(item)
    message = pb.Item(seq=1, json='{"a":1}', metadata={"m": "1"})
    message.create_time.FromDatetime(created)
    decoded = StoredItem.from_proto(message)
    for copied in (pickle.loads(pickle.dumps(decoded)), copy.deepcopy(decoded)):
        assert copied == decoded
        assert copied.raw_json == decoded.raw_json
        assert copied.data is not decoded.data
    match decoded:
        case StoredItem(seq, data, metadata, create_time):
            assert (seq, data, metadata, create_time) == (1, {"a": 1}, {"m": "1"}, created)


async def test_a_session_sees_writes_made_through_another_connection_between_turns(
    state_server: StateServer,
) -> None:
    agent = Agent(name="a", instructions="Answer briefly.", model=OfflineModel())
    config = RunConfig(tracing_disabled=True)
    async with (
        StateClient(state_server.address) as mine,
        StateClient(state_server.address) as theirs,
    ):
        session = StateServiceSession("shared", client=mine)
        other = StateServiceSession("shared", client=theirs)
        await Runner.run(agent, "first", session=session, run_config=config)
        await Runner.run(agent, "second", session=session, run_config=config)
        kept = await session.get_items()  # served from the session's copy
        assert len(kept) == 4
        # Another process appends: the next turn's history has it.
        await other.add_items([_message(100)])
        assert await session.get_items() == [*kept, _message(100)]
        await Runner.run(agent, "third", session=session, run_config=config)
        history = await other.get_items()
        assert history[: len(kept) + 1] == [*kept, _message(100)]
        assert await session.get_items() == history
        # A pop and an append elsewhere leave the count as it was, not the log.
        await other.pop_item()
        await other.add_items([_message(101)])
        assert await session.get_items() == [*history[:-1], _message(101)]
        # A compaction elsewhere: the history becomes the compacted view.
        etag = (await theirs.list_items("shared", page_size=1)).etag
        await theirs.compact_session("shared", [_message(102)], etag=etag)
        assert await session.get_items() == [_message(102)]
        await session.add_items([_message(103)])
        assert await session.get_items() == [_message(102), _message(103)]
        assert await other.get_items() == [_message(102), _message(103)]
        # Deleted elsewhere: nothing is served from the old copy.
        await theirs.delete_session("shared")
        assert await session.get_items() == []

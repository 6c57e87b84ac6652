"""Tool approvals across replicas: a turn pauses on a tool that needs
approval, the paused run is kept by the state service, and any agent replica
resumes it exactly once. Real state and agent servers (in process, and as
processes for the kill test), real Redis, the offline model ("remember ..."
makes it call save_note)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis

from agent_service.approvals import claim_id_of, run_of_approval
from agent_service.client import AgentClient, AgentServiceError, ChatResult
from agent_service.turns import AGENT_KEY, REQUEST_ID_KEY
from state_service.client import NewItem, PendingApproval, StateClient, StateServiceError
from state_service.server import StateServer
from state_service.storage.embedded import EmbeddedRedis, free_port
from tests.conftest import AgentServerFactory, StateServerFactory, write_agents_file
from tests.fake_openai import FakeOpenAI, Step
from tests.helpers import metric
from tests.patience import patience
from tests.processes import agent_service_process, wait_serving

AGENTS = """
agents:
  - name: assistant
    model: offline
    tools: [save_note, list_notes, calculate]
    needs_approval: [save_note]
"""


@pytest.fixture
def agents_file(tmp_path: Path) -> Path:
    return write_agents_file(tmp_path, AGENTS)


@pytest.fixture
async def approving(
    agent_server_factory: AgentServerFactory, agents_file: Path
) -> AsyncIterator[AgentClient]:
    server = await agent_server_factory(agents_config=agents_file)
    async with AgentClient(server.address, timeout=10.0) as client:
        yield client


async def _pause(agents: AgentClient, session: str, request_id: str = "t1") -> ChatResult:
    paused = await agents.chat(session, "remember the door code is 4711", request_id=request_id)
    assert paused.pending_approvals, paused
    return paused


def _tool_runs(text: str) -> float:
    found = re.search(
        r'^statecar_agent_approved_tool_runs_total\{tool="save_note"\} (\S+)$', text, re.M
    )
    return float(found.group(1)) if found else 0.0


async def test_pause_then_approve_stores_the_whole_turn(
    approving: AgentClient, client: StateClient
) -> None:
    await approving.chat("s", "Hello there.")
    before = {
        "paused": metric("statecar_agent_turns_total", agent="assistant", outcome="paused"),
        "pauses": metric("statecar_agent_approval_pauses_total", agent="assistant"),
        "ok": metric("statecar_agent_resumes_total", outcome="ok"),
        "replayed": metric("statecar_agent_resumes_total", outcome="replayed"),
        "approve": metric("statecar_agent_approval_decisions_total", decision="approve"),
        "claims": metric("statecar_state_paused_runs_total", step="claim"),
    }
    paused = await _pause(approving, "s")
    assert paused.items == [] and paused.reply == ""
    (approval,) = paused.pending_approvals
    assert approval.tool_name == "save_note"
    assert approval.arguments == {"note": "the door code is 4711"}
    assert len(await client.all_items("s")) == 2  # nothing of the paused turn yet
    assert [a.approval_id for a in await approving.list_approvals("s")] == [approval.approval_id]

    turn, decisions = await approving.resolve_approvals(
        "s", approve=[approval.approval_id], request_id="r1"
    )
    assert decisions == {approval.approval_id: "approve"}
    assert [i.type for i in turn.items] == [
        "message",
        "function_call",
        "function_call_output",
        "message",
    ]
    assert "saved note: the door code is 4711" in turn.reply
    stored = await client.all_items("s")
    assert [i.data for i in stored[2:]] == [i.data for i in turn.items]
    assert {i.metadata[REQUEST_ID_KEY] for i in stored[2:]} == {"turn:t1"}
    assert await approving.list_approvals("s") == []

    # A retry of the resume returns the first response and runs nothing.
    again, _ = await approving.resolve_approvals(
        "s", approve=[approval.approval_id], request_id="r1"
    )
    assert again.replayed and again.raw.items == turn.raw.items
    after = {
        "paused": metric("statecar_agent_turns_total", agent="assistant", outcome="paused"),
        "pauses": metric("statecar_agent_approval_pauses_total", agent="assistant"),
        "ok": metric("statecar_agent_resumes_total", outcome="ok"),
        "replayed": metric("statecar_agent_resumes_total", outcome="replayed"),
        "approve": metric("statecar_agent_approval_decisions_total", decision="approve"),
        "claims": metric("statecar_state_paused_runs_total", step="claim"),
    }
    assert {k: after[k] - before[k] for k in before} == dict.fromkeys(before, 1)
    # A retry of the original Chat finds the stored turn.
    retried = await approving.chat("s", "remember the door code is 4711", request_id="t1")
    assert retried.replayed and not retried.pending_approvals
    assert len(await client.all_items("s")) == 6
    # Another request resuming it again is refused.
    with pytest.raises(AgentServiceError) as refused:
        await approving.resolve_approvals("s", approve=[approval.approval_id], request_id="r2")
    assert (refused.value.code, refused.value.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "ALREADY_RESOLVED",
    )


async def test_reject_does_not_run_the_tool_and_the_model_sees_it(
    approving: AgentClient, client: StateClient
) -> None:
    await _pause(approving, "s")
    turn, decisions = await approving.resolve_approvals(
        "s", remaining="reject", rejection_message="not allowed here"
    )
    assert list(decisions.values()) == ["reject"]
    output = next(i for i in turn.items if i.type == "function_call_output")
    assert output.data["output"] == "not allowed here"
    assert "not allowed here" in turn.reply  # the offline model repeats tool outputs
    stored = await client.all_items("s")
    assert not any("saved note" in str(i.data) for i in stored)


async def test_a_retry_of_a_resume_whose_replica_died_finishes_only_if_the_turn_was_stored(
    approving: AgentClient, client: StateClient
) -> None:
    """The two crash points of a resume, made deterministic by doing the first
    attempt's steps by hand: claimed and died before storing the turn (the
    retry is refused: the tool may have run), and died after storing it but
    before resolving (the retry completes the resume from the log)."""
    for session, stored in (("died-before", False), ("died-after", True)):
        paused = await _pause(approving, session, request_id="t1")
        run_id = run_of_approval(paused.pending_approvals[0].approval_id)
        await client.claim_paused_run(session, run_id, claim_id_of("go"))
        if stored:
            metadata = {REQUEST_ID_KEY: "turn:t1", AGENT_KEY: "assistant"}
            await client.append_items(
                session,
                [
                    NewItem(
                        {"role": "user", "content": "remember the door code is 4711"}, metadata
                    ),
                    NewItem({"role": "assistant", "content": "saved it"}, metadata),
                ],
                request_id="turn:t1",
            )
            turn, _ = await approving.resolve_approvals(
                session, remaining="approve", request_id="go"
            )
            assert turn.replayed and turn.reply == "saved it" and len(turn.items) == 2
            again, _ = await approving.resolve_approvals(
                session, remaining="approve", request_id="go"
            )
            assert again.replayed and again.raw.items == turn.raw.items
        else:
            with pytest.raises(AgentServiceError) as refused:
                await approving.resolve_approvals(session, remaining="approve", request_id="go")
            assert refused.value.reason == "RESUME_CONFLICT"
            assert await client.all_items(session) == []


async def test_a_retried_chat_returns_the_same_pending_approvals(approving: AgentClient) -> None:
    first = await _pause(approving, "s", "same")
    second = await _pause(approving, "s", "same")
    assert second.replayed
    assert [a.approval_id for a in second.pending_approvals] == [
        a.approval_id for a in first.pending_approvals
    ]
    assert len(await approving.list_approvals("s")) == 1


async def test_a_resumed_run_that_calls_another_gated_tool_pauses_again(
    agent_server_factory: AgentServerFactory, client: StateClient, tmp_path: Path
) -> None:
    fake = FakeOpenAI(
        steps=[
            Step(call=("save_note", {"note": "first"})),
            Step(call=("save_note", {"note": "second"})),
            Step(text="both saved"),
        ]
    )
    agents_file = write_agents_file(
        tmp_path,
        "agents:\n  - name: assistant\n    tools: [save_note]\n    needs_approval: [save_note]\n",
    )
    with fake.serve() as url:
        server = await agent_server_factory(
            agents_config=agents_file, model_base_url=url, model_api_key="test-key"
        )
        async with AgentClient(server.address, timeout=10.0) as agents:
            first = await agents.chat("s", "save two notes", request_id="t1")
            (one,) = first.pending_approvals
            again, decided = await agents.resolve_approvals("s", approve=[one.approval_id])
            assert decided == {one.approval_id: "approve"}
            (two,) = again.pending_approvals
            assert two.arguments == {"note": "second"} and again.items == []
            assert await client.all_items("s") == []  # the turn is not finished yet
            done, _ = await agents.resolve_approvals("s", remaining="approve", request_id="r2")
            assert done.reply == "both saved" and not done.pending_approvals
            retried, _ = await agents.resolve_approvals("s", remaining="approve", request_id="r2")
            assert retried.replayed and retried.raw.items == done.raw.items
    stored = await client.all_items("s")
    assert [i.data.get("type", "message") for i in stored] == [
        "message",
        "function_call",
        "function_call_output",
        "function_call",
        "function_call_output",
        "message",
    ]
    assert {i.metadata[REQUEST_ID_KEY] for i in stored} == {"turn:t1"}


async def test_streamed_turns_pause_too(approving: AgentClient) -> None:
    final = None
    async for event in approving.stream_chat("s", "remember to water the plants"):
        final = event
    assert isinstance(final, ChatResult) and final.pending_approvals


async def test_bad_resolve_requests(approving: AgentClient) -> None:
    cases: list[tuple[dict[str, object], grpc.StatusCode, str]] = [
        ({}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD"),  # nothing decided
        ({"remaining": "approve"}, grpc.StatusCode.NOT_FOUND, "APPROVAL_NOT_FOUND"),
        ({"approve": ["run-x.1"]}, grpc.StatusCode.NOT_FOUND, "APPROVAL_NOT_FOUND"),
    ]
    for kwargs, code, reason in cases:
        with pytest.raises(AgentServiceError) as raised:
            await approving.resolve_approvals("s", **kwargs)  # type: ignore[arg-type]
        assert (raised.value.code, raised.value.reason) == (code, reason), kwargs
    paused = await _pause(approving, "s")
    (approval,) = paused.pending_approvals
    more: list[tuple[dict[str, object], grpc.StatusCode, str]] = [
        (
            {"approve": [approval.approval_id + "9"]},
            grpc.StatusCode.NOT_FOUND,
            "APPROVAL_NOT_FOUND",
        ),
        (
            {"approve": [approval.approval_id], "reject": [approval.approval_id]},
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_FIELD",
        ),
    ]
    for kwargs, code, reason in more:
        with pytest.raises(AgentServiceError) as raised:
            await approving.resolve_approvals("s", **kwargs)  # type: ignore[arg-type]
        assert (raised.value.code, raised.value.reason) == (code, reason), kwargs
    with pytest.raises(AgentServiceError) as raised:
        await approving.resolve_approvals("bad id", remaining="approve")
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    # Nothing was claimed by the refused calls: the run still resumes.
    turn, _ = await approving.resolve_approvals("s", remaining="approve")
    assert "saved note" in turn.reply


async def test_expired_paused_runs_are_not_found(
    state_server_factory: StateServerFactory,
    agent_server_factory: AgentServerFactory,
    agents_file: Path,
) -> None:
    short = await state_server_factory(paused_run_ttl_seconds=1)
    server = await agent_server_factory(agents_config=agents_file, state_target=short.address)
    async with AgentClient(server.address, timeout=10.0) as agents:
        paused = await _pause(agents, "s")
        await asyncio.sleep(1.2)
        assert await agents.list_approvals("s") == []
        with pytest.raises(AgentServiceError) as raised:
            await agents.resolve_approvals("s", approve=[paused.pending_approvals[0].approval_id])
        assert (raised.value.code, raised.value.reason) == (
            grpc.StatusCode.NOT_FOUND,
            "APPROVAL_NOT_FOUND",
        )


# -- the state service's paused-run RPCs ---------------------------------------------


def _approval(n: int = 1) -> PendingApproval:
    return PendingApproval(f"run-1.{n}", "save_note", '{"note": "x"}', "assistant", f"call-{n}")


async def test_paused_runs_are_one_hash_per_session_and_claimed_once(
    client: StateClient, redis_server: EmbeddedRedis
) -> None:
    appended = await client.append_items("s", [{"role": "user", "content": "hi"}])
    run, replayed = await client.put_paused_run(
        "s", "run-1", b"state", [_approval()], etag=appended.etag
    )
    assert (run.status, replayed) == ("paused", False)
    again, replayed = await client.put_paused_run("s", "run-1", b"other", [_approval(2)], etag="")
    assert replayed and again.approvals == [_approval()]  # the first one stays
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        assert set(await raw.keys("*:p")) == {b"statecar:{default:s}:p"}
        assert 0 < await raw.pttl("statecar:{default:s}:p") <= 24 * 3600 * 1000
    finally:
        await raw.aclose()

    claimed = await client.claim_paused_run("s", "run-1", "c1")
    assert (claimed.state, claimed.resolved, claimed.run.claim_id) == (b"state", False, "c1")
    held = await client.claim_paused_run("s", "run-1", "c1")  # the holder's retry
    assert (held.held, held.resolved, held.state) == (True, False, b"state")
    with pytest.raises(StateServiceError) as busy:  # anyone else
        await client.claim_paused_run("s", "run-1", "c2")
    assert (busy.value.code, busy.value.reason) == (grpc.StatusCode.ABORTED, "PAUSED_RUN_CLAIMED")
    with pytest.raises(StateServiceError) as not_holder:
        await client.resolve_paused_run("s", "run-1", "c2", b"result")
    assert not_holder.value.reason == "PAUSED_RUN_CLAIMED"
    resolved = await client.resolve_paused_run("s", "run-1", "c1", b"result")
    assert resolved.status == "resolved"
    await client.resolve_paused_run("s", "run-1", "c1", b"result")  # idempotent
    replay = await client.claim_paused_run("s", "run-1", "c1")
    assert (replay.state, replay.resolved) == (b"result", True)
    with pytest.raises(StateServiceError) as done:
        await client.claim_paused_run("s", "run-1", "c2")
    assert (done.value.code, done.value.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "PAUSED_RUN_RESOLVED",
    )
    with pytest.raises(StateServiceError) as missing:
        await client.claim_paused_run("s", "run-2", "c1")
    assert (missing.value.code, missing.value.reason) == (
        grpc.StatusCode.NOT_FOUND,
        "PAUSED_RUN_NOT_FOUND",
    )
    # Tenant-scoped and session-scoped: another session sees none.
    assert await client.list_paused_runs("other") == []


async def test_paused_runs_are_sealed_at_rest_when_encryption_is_on(
    state_server_factory: StateServerFactory, redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    keys.write_text("*:k1:" + base64.b64encode(os.urandom(32)).decode() + "\n")
    server = await state_server_factory(encryption_keys_file=keys)
    secret = "the door code is 4711"
    async with StateClient(server.address) as state:
        approval = PendingApproval("run-1.1", "save_note", json.dumps({"note": secret}), "a", "c")
        await state.put_paused_run("s", "run-1", secret.encode(), [approval])
        raw = aioredis.Redis.from_url(redis_server.url)
        try:
            stored = await raw.hgetall("statecar:{default:s}:p")
        finally:
            await raw.aclose()
        assert stored and all(secret.encode() not in value for value in stored.values())
        assert (await state.list_paused_runs("s"))[0].approvals == [approval]
        assert (await state.claim_paused_run("s", "run-1", "c1")).state == secret.encode()


async def test_paused_runs_are_per_tenant(
    state_server_factory: StateServerFactory, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("alpha:token-alpha\nbeta:token-beta\n")
    server = await state_server_factory(auth="token", auth_tokens_file=tokens)
    async with (
        StateClient(server.address, bearer_token="token-alpha") as alpha,
        StateClient(server.address, bearer_token="token-beta") as beta,
    ):
        await alpha.put_paused_run("s", "run-1", b"state", [_approval()])
        assert await beta.list_paused_runs("s") == []
        with pytest.raises(StateServiceError) as hidden:
            await beta.claim_paused_run("s", "run-1", "c1")
        assert hidden.value.reason == "PAUSED_RUN_NOT_FOUND"
        assert (await alpha.claim_paused_run("s", "run-1", "c1")).state == b"state"


@pytest.mark.slow
@pytest.mark.parametrize("redis_backend", ["cluster"])
async def test_paused_runs_on_a_redis_cluster(client: StateClient) -> None:
    """Every paused-run script touches only the session's slot (meta and :p)."""
    appended = await client.append_items("s", [{"role": "user", "content": "hi"}])
    await client.put_paused_run("s", "run-1", b"state", [_approval()], etag=appended.etag)
    assert [r.status for r in await client.list_paused_runs("s")] == ["paused"]
    assert (await client.claim_paused_run("s", "run-1", "c1")).state == b"state"
    await client.resolve_paused_run("s", "run-1", "c1", b"result")
    assert (await client.claim_paused_run("s", "run-1", "c1")).state == b"result"


async def test_a_paused_run_of_a_deleted_session_is_gone(client: StateClient) -> None:
    appended = await client.append_items("s", [{"role": "user", "content": "hi"}])
    await client.put_paused_run("s", "run-1", b"state", [_approval()], etag=appended.etag)
    await client.delete_session("s")
    await client.append_items("s", [{"role": "user", "content": "a new life"}])
    assert await client.list_paused_runs("s") == []
    with pytest.raises(StateServiceError) as gone:
        await client.claim_paused_run("s", "run-1", "c1")
    assert gone.value.reason == "PAUSED_RUN_NOT_FOUND"


async def test_erasing_a_session_erases_its_paused_runs(client: StateClient) -> None:
    await client.put_paused_run("s", "run-1", b"state", [_approval()])
    await client.erase_session("s")
    assert await client.list_paused_runs("s") == []
    with pytest.raises(StateServiceError) as gone:
        await client.claim_paused_run("s", "run-1", "c1")
    assert gone.value.reason == "PAUSED_RUN_NOT_FOUND"


async def test_paused_run_puts_are_etag_guarded_and_bounded(
    state_server_factory: StateServerFactory,
) -> None:
    server = await state_server_factory(max_paused_runs=2, max_paused_run_bytes=2048)
    async with StateClient(server.address, timeout=5.0) as state:
        first = await state.append_items("s", [{"role": "user", "content": "hi"}])
        await state.append_items("s", [{"role": "user", "content": "again"}])
        with pytest.raises(StateServiceError) as stale:
            await state.put_paused_run("s", "run-1", b"x", [_approval()], etag=first.etag)
        assert (stale.value.code, stale.value.reason) == (
            grpc.StatusCode.ABORTED,
            "ETAG_MISMATCH",
        )
        with pytest.raises(StateServiceError) as big:
            await state.put_paused_run("s", "run-1", b"x" * 4096, [_approval()])
        assert (big.value.code, big.value.reason) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "PAUSED_RUN_LIMIT",
        )
        await state.put_paused_run("s", "run-1", b"x", [_approval()])
        await state.put_paused_run("s", "run-2", b"x", [_approval()])
        with pytest.raises(StateServiceError) as full:
            await state.put_paused_run("s", "run-3", b"x", [_approval()])
        assert (full.value.code, full.value.reason) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "PAUSED_RUN_LIMIT",
        )
        assert [r.run_id for r in await state.list_paused_runs("s")] == ["run-1", "run-2"]
        invalid: list[tuple[str, str, bytes, list[PendingApproval]]] = [
            ("bad id", "run-4", b"x", [_approval()]),
            ("s", "", b"x", [_approval()]),
            ("s", "run:4", b"x", [_approval()]),
            ("s", "run-4", b"", [_approval()]),
            ("s", "run-4", b"x", []),
        ]
        for session, run_id, body, approvals in invalid:
            with pytest.raises(StateServiceError) as refused:
                await state.put_paused_run(session, run_id, body, approvals)
            assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT, (session, run_id)
        with pytest.raises(StateServiceError) as no_claim:
            await state.claim_paused_run("s", "run-1", "")
        assert no_claim.value.code == grpc.StatusCode.INVALID_ARGUMENT


# -- two agent replicas as processes ----------------------------------------------


def _replica_env(agents_file: Path, metrics_port: int) -> dict[str, str]:
    return {
        "AGENT_SERVICE_AGENTS_CONFIG": str(agents_file),
        "AGENT_SERVICE_METRICS_PORT": str(metrics_port),
        "AGENT_SERVICE_MODEL_API_KEY": "",
        "AGENT_SERVICE_MODEL_BASE_URL": "",
    }


async def _tool_runs_at(metrics_port: int) -> float:
    def scrape() -> str:
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())

    return _tool_runs(await asyncio.to_thread(scrape))


@pytest.mark.slow
@pytest.mark.fault
async def test_pause_on_a_kill9_a_resume_on_b_runs_the_tool_once(
    state_server: StateServer, client: StateClient, agents_file: Path
) -> None:
    port_a, port_b = free_port(), free_port()
    with (
        agent_service_process(state_server.address, _replica_env(agents_file, port_a)) as (
            a,
            process_a,
        ),
        agent_service_process(state_server.address, _replica_env(agents_file, port_b)) as (b, _),
    ):
        await asyncio.gather(wait_serving(a), wait_serving(b))
        async with AgentClient(a, timeout=10) as on_a:
            await on_a.chat("conv", "Hello there.", request_id="t0")
            paused = await _pause(on_a, "conv")
        process_a.send_signal(signal.SIGKILL)
        await asyncio.to_thread(process_a.wait, 10)
        async with AgentClient(b, timeout=10) as on_b:
            pending = await on_b.list_approvals("conv")
            assert [p.approval_id for p in pending] == [
                p.approval_id for p in paused.pending_approvals
            ]
            turn, _ = await on_b.resolve_approvals("conv", remaining="approve", request_id="go")
            again, _ = await on_b.resolve_approvals("conv", remaining="approve", request_id="go")
        assert again.replayed and again.raw.items == turn.raw.items
        assert await _tool_runs_at(port_b) == 1
    stored = await client.all_items("conv")
    assert [i.data.get("type", "message") for i in stored] == [
        "message",
        "message",
        "message",
        "function_call",
        "function_call_output",
        "message",
    ]
    assert [i.metadata[REQUEST_ID_KEY] for i in stored] == ["turn:t0"] * 2 + ["turn:t1"] * 4
    assert stored[2].data["content"] == "remember the door code is 4711"
    assert "saved note: the door code is 4711" in str(stored[4].data)


@pytest.mark.slow
@pytest.mark.fault
async def test_racing_resumes_on_two_replicas_run_the_tool_once(
    state_server: StateServer, client: StateClient, agents_file: Path
) -> None:
    port_a, port_b = free_port(), free_port()
    rounds = 6
    outcomes: list[str] = []
    with (
        agent_service_process(state_server.address, _replica_env(agents_file, port_a)) as (a, _),
        agent_service_process(state_server.address, _replica_env(agents_file, port_b)) as (b, _),
    ):
        await asyncio.gather(wait_serving(a), wait_serving(b))
        async with AgentClient(a, timeout=10) as on_a, AgentClient(b, timeout=10) as on_b:
            for n in range(rounds):
                await _pause(on_a, f"race{n}", request_id=f"t{n}")
                results = await asyncio.gather(
                    on_a.resolve_approvals(f"race{n}", remaining="approve", request_id=f"a{n}"),
                    on_b.resolve_approvals(f"race{n}", remaining="approve", request_id=f"b{n}"),
                    return_exceptions=True,
                )
                won = [r for r in results if not isinstance(r, BaseException)]
                lost = [r for r in results if isinstance(r, BaseException)]
                assert len(won) == 1 and len(lost) == 1, results
                error = lost[0]
                assert isinstance(error, AgentServiceError), error
                assert (error.code, error.reason) in {
                    (grpc.StatusCode.ABORTED, "RESUME_CONFLICT"),
                    (grpc.StatusCode.FAILED_PRECONDITION, "ALREADY_RESOLVED"),
                }, error
                outcomes.append(error.reason)
        runs = await _tool_runs_at(port_a) + await _tool_runs_at(port_b)
    assert runs == rounds
    for n in range(rounds):
        stored = await client.all_items(f"race{n}")
        assert [i.data.get("type", "message") for i in stored] == [
            "message",
            "function_call",
            "function_call_output",
            "message",
        ]
    print(f"\nracing resumes: {rounds} rounds, tool ran {runs:g} times, losers {outcomes}")


# -- the CLI -----------------------------------------------------------------------


async def test_cli_shows_pending_approvals_and_approves(
    agent_server_factory: AgentServerFactory, agents_file: Path, client: StateClient
) -> None:
    server = await agent_server_factory(agents_config=agents_file)

    async def cli(*args: str) -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "agent_service.cli",
            *args,
            "--agent-target",
            server.address,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200"},
        )
        out, _ = await asyncio.wait_for(process.communicate(), 60)
        return process.returncode or 0, out.decode()

    code, out = await cli("chat", "--session", "s", "remember the door code is 4711")
    assert code == 0, out
    approval_id = re.search(r"(run-[0-9a-f]+\.1)", out)
    assert approval_id and "save_note" in out, out
    code, out = await cli("approve", "s")
    assert code == 0 and approval_id.group(1) in out, out
    code, out = await cli("approve", "s", approval_id.group(1))
    assert code == 0 and "saved note" in out, out
    assert len(await client.all_items("s")) == 4
    code, out = await cli("approve", "s", "--reject", "--all")
    assert code != 0 and "FAILED_PRECONDITION" in out, out  # resumed already


@pytest.mark.slow
@pytest.mark.fault
async def test_a_resumer_killed_mid_run_leaves_the_run_claimed_and_the_tool_run_once(
    state_server: StateServer, client: StateClient, tmp_path: Path
) -> None:
    """The documented crash case: B claims, runs the tool, and dies while the
    model call after it is in flight. Whether the tool ran cannot be known by
    others, so no other resume may run it: A is refused until the run expires,
    and nothing of the turn is stored."""
    fake = FakeOpenAI(
        steps=[
            Step(call=("save_note", {"note": "the door code is 4711"})),
            Step(text="ok", delay=3),
        ]
    )
    agents_file = write_agents_file(
        tmp_path,
        "agents:\n  - name: assistant\n    tools: [save_note]\n    needs_approval: [save_note]\n",
    )
    port_a, port_b = free_port(), free_port()
    with fake.serve() as url:
        env_a = {**_replica_env(agents_file, port_a), "AGENT_SERVICE_MODEL_BASE_URL": url}
        env_b = {**_replica_env(agents_file, port_b), "AGENT_SERVICE_MODEL_BASE_URL": url}
        env_a["AGENT_SERVICE_MODEL_API_KEY"] = env_b["AGENT_SERVICE_MODEL_API_KEY"] = "test-key"
        with (
            agent_service_process(state_server.address, env_a) as (a, _),
            agent_service_process(state_server.address, env_b) as (b, process_b),
        ):
            await asyncio.gather(wait_serving(a), wait_serving(b))
            async with AgentClient(a, timeout=10) as on_a, AgentClient(b, timeout=10) as on_b:
                paused = await on_a.chat("s", "please save a note", request_id="t1")
                assert paused.pending_approvals
                resume = asyncio.create_task(
                    on_b.resolve_approvals("s", remaining="approve", request_id="go")
                )
                deadline = asyncio.get_running_loop().time() + patience(20)
                while len(fake.requests) < 2:  # the model call after the tool is in flight
                    assert asyncio.get_running_loop().time() < deadline, fake.requests
                    await asyncio.sleep(0.02)
                assert await _tool_runs_at(port_b) == 1
                process_b.send_signal(signal.SIGKILL)
                with pytest.raises(AgentServiceError):
                    await resume
                for request_id in ("go", "another"):
                    with pytest.raises(AgentServiceError) as refused:
                        await on_a.resolve_approvals(
                            "s", remaining="approve", request_id=request_id
                        )
                    assert (refused.value.code, refused.value.reason) == (
                        grpc.StatusCode.ABORTED,
                        "RESUME_CONFLICT",
                    )
            assert await _tool_runs_at(port_a) == 0
    assert await client.all_items("s") == []


def test_needs_approval_must_name_the_agents_own_tools(tmp_path: Path) -> None:
    from agent_service.config import ConfigError, load_config

    path = write_agents_file(
        tmp_path, "agents:\n  - name: a\n    tools: [calculate]\n    needs_approval: [save_note]\n"
    )
    with pytest.raises(ConfigError, match="needs_approval names tools it does not have"):
        load_config(path)

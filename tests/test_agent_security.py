"""TLS and mTLS on every hop: callers -> agent service -> state service, with
the agent's client certificate (or bearer token) as its tenant at the state
service."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent_service.client import AgentClient, AgentServiceError
from agent_service.server import AgentServer
from shared_runtime.tls import channel_credentials
from state_service.client import StateClient
from state_service.server import StateServer
from tests.certs import CertificateAuthority, Issued
from tests.conftest import AgentServerFactory, StateServerFactory
from tests.helpers import NOT_SERVING, SERVING, health_status, wait_health

pytestmark = pytest.mark.usefixtures("redis_server")


async def mtls_on_both_hops(
    ca: CertificateAuthority,
    agent_identity: Issued,
    state_server_factory: StateServerFactory,
    agent_server_factory: AgentServerFactory,
    *,
    state_options: dict[str, Any] | None = None,
    agent_options: dict[str, Any] | None = None,
) -> tuple[StateServer, AgentServer]:
    """A state service requiring client certificates (tenant = CN) and an agent
    service serving mTLS that reaches it with `agent_identity`."""
    state_cert = ca.issue("state-service", server=True)
    state = await state_server_factory(
        auth="mtls",
        tls_cert_file=state_cert.cert,
        tls_key_file=state_cert.key,
        tls_client_ca_file=ca.cert_file,
        **(state_options or {}),
    )
    agent_cert = ca.issue("agent-service", server=True)
    agent = await agent_server_factory(
        state_target=state.address,
        tls_cert_file=agent_cert.cert,
        tls_key_file=agent_cert.key,
        tls_client_ca_file=ca.cert_file,
        state_tls_ca_file=ca.cert_file,
        state_tls_cert_file=agent_identity.cert,
        state_tls_key_file=agent_identity.key,
        **(agent_options or {}),
    )
    return state, agent


async def test_mtls_on_both_hops(
    state_server_factory: StateServerFactory,
    agent_server_factory: AgentServerFactory,
    tmp_path: Path,
) -> None:
    ca = CertificateAuthority(tmp_path / "pki")
    agent_identity = ca.issue("team-a")  # the agent's tenant at the state service
    state, agent = await mtls_on_both_hops(
        ca, agent_identity, state_server_factory, agent_server_factory
    )
    caller = ca.issue("backend")
    credentials = channel_credentials(ca.cert_file, caller.cert, caller.key)
    async with AgentClient(agent.address, credentials=credentials, timeout=10) as agents:
        result = await agents.chat("s1", "Hello over mTLS")
    assert result.reply.startswith("(offline model)")

    as_team_a = channel_credentials(ca.cert_file, agent_identity.cert, agent_identity.key)
    other = ca.issue("team-b")
    as_team_b = channel_credentials(ca.cert_file, other.cert, other.key)
    async with (
        StateClient(state.address, credentials=as_team_a) as team_a,
        StateClient(state.address, credentials=as_team_b) as team_b,
    ):
        assert len(await team_a.all_items("s1")) == 2
        assert await team_b.all_items("s1") == []

    # A caller without a client certificate never gets through the handshake.
    async with AgentClient(
        agent.address, credentials=channel_credentials(ca.cert_file), timeout=3
    ) as anonymous:
        with pytest.raises(AgentServiceError):
            await anonymous.list_agents()


async def test_bearer_token_to_the_state_service(
    state_server_factory: StateServerFactory,
    agent_server_factory: AgentServerFactory,
    tmp_path: Path,
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("team-a:s3cret-token-a\n")
    state = await state_server_factory(auth="token", auth_tokens_file=tokens)
    agent = await agent_server_factory(
        state_target=state.address, state_bearer_token="s3cret-token-a"
    )
    async with AgentClient(agent.address, timeout=10) as agents:
        await agents.chat("s1", "Hello with a token")
    async with StateClient(state.address, bearer_token="s3cret-token-a") as team_a:
        assert len(await team_a.all_items("s1")) == 2

    wrong = await agent_server_factory(state_target=state.address, state_bearer_token="nope")
    async with AgentClient(wrong.address, timeout=10) as agents:
        with pytest.raises(AgentServiceError) as refused:
            await agents.chat("s1", "Hello")
    assert refused.value.code.name == "UNAVAILABLE"
    assert "UNAUTHENTICATED" in refused.value.message


async def test_agent_callers_are_tenants_at_the_state_service(
    state_server_factory: StateServerFactory,
    agent_server_factory: AgentServerFactory,
    tmp_path: Path,
) -> None:
    # The agent holds the only state-service credential ("agents", a
    # delegate); each of its callers is a tenant of its own all the way down.
    state_tokens = tmp_path / "state-tokens"
    state_tokens.write_text("agents:agent-secret\n")
    state = await state_server_factory(
        auth="token", auth_tokens_file=state_tokens, auth_delegates="agents"
    )
    caller_tokens = tmp_path / "caller-tokens"
    caller_tokens.write_text("alice:alice-token\nbob:bob-token\n")
    agent = await agent_server_factory(
        state_target=state.address,
        state_bearer_token="agent-secret",
        auth="token",
        auth_tokens_file=caller_tokens,
    )
    async with (
        AgentClient(agent.address, bearer_token="alice-token", timeout=10) as alice,
        AgentClient(agent.address, bearer_token="bob-token", timeout=10) as bob,
    ):
        await alice.chat("s1", "My locker code is 4471.")
        answer = await bob.chat("s1", "What is my locker code?")
        assert "4471" not in answer.reply  # bob's "s1" is not alice's
        assert "4471" in (await alice.chat("s1", "What is my locker code?")).reply

        started = await alice.chat("", "Hello", workflow_id="w1")
        assert started.workflow is not None
        for call in (
            bob.get_workflow("w1"),
            bob.update_workflow("w1", current_stage=started.workflow.current_stage),
        ):
            with pytest.raises(AgentServiceError) as hidden:
                await call
            assert hidden.value.code == grpc.StatusCode.NOT_FOUND
        assert (await alice.get_workflow("w1")).etag == started.workflow.etag

    def acting_for(tenant: str) -> StateClient:
        return StateClient(state.address, bearer_token="agent-secret", acting_for=lambda: tenant)

    async with acting_for("alice") as as_alice, acting_for("bob") as as_bob:
        assert len(await as_alice.all_items("s1")) == 4
        assert len(await as_bob.all_items("s1")) == 2
    async with StateClient(state.address, bearer_token="agent-secret") as as_agent:
        assert await as_agent.all_items("s1") == []

    for token in (None, "wrong"):
        async with AgentClient(agent.address, bearer_token=token, timeout=10) as anonymous:
            with pytest.raises(AgentServiceError) as refused:
                await anonymous.list_agents()
            assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(AgentServiceError) as refused:
                await anonymous.chat("s1", "Hello")
            assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
    await wait_health(agent.address, SERVING)  # probes need no token

    # A caller cannot pick its tenant: the agent takes no delegates of its own.
    spoofing = (("statecar-tenant", "alice"),)
    async with AgentClient(
        agent.address, bearer_token="bob-token", metadata=spoofing, timeout=10
    ) as bob_as_alice:
        with pytest.raises(AgentServiceError) as denied:
            await bob_as_alice.chat("s1", "What is my locker code?")
    assert denied.value.code == grpc.StatusCode.PERMISSION_DENIED


async def test_agent_mtls_callers_are_tenants(
    state_server_factory: StateServerFactory,
    agent_server_factory: AgentServerFactory,
    tmp_path: Path,
) -> None:
    ca = CertificateAuthority(tmp_path / "pki")
    agent_identity = ca.issue("agents")
    state, agent = await mtls_on_both_hops(
        ca,
        agent_identity,
        state_server_factory,
        agent_server_factory,
        state_options={"auth_delegates": "agents"},
        agent_options={"auth": "mtls"},
    )
    for team in ("team-x", "team-y"):
        identity = ca.issue(team)
        credentials = channel_credentials(ca.cert_file, identity.cert, identity.key)
        async with AgentClient(agent.address, credentials=credentials, timeout=10) as caller:
            await caller.chat("s1", f"My team is {team}.")
    as_agent = channel_credentials(ca.cert_file, agent_identity.cert, agent_identity.key)
    for team in ("team-x", "team-y"):
        async with StateClient(
            state.address, credentials=as_agent, acting_for=functools.partial(str, team)
        ) as client:
            items = await client.all_items("s1")
        assert len(items) == 2
        assert items[0].data.get("content") == f"My team is {team}."


async def test_agent_with_callers_is_not_ready_until_the_state_service_honours_them(
    state_server_factory: StateServerFactory,
    agent_server_factory: AgentServerFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A state service that ignores statecar-tenant would put every caller
    # into one tenant: the agent stays out of rotation and says why.
    caller_tokens = tmp_path / "caller-tokens"
    caller_tokens.write_text("alice:alice-token\n")
    state = await state_server_factory()
    agent = await agent_server_factory(
        state_target=state.address, auth="token", auth_tokens_file=caller_tokens
    )
    assert await health_status(agent.address) == NOT_SERVING
    assert "STATE_SERVICE_AUTH_DELEGATES" in caplog.text

    trusting = await state_server_factory(auth_delegates="default")
    agent = await agent_server_factory(
        state_target=trusting.address, auth="token", auth_tokens_file=caller_tokens
    )
    # Its first probe may time out on a loaded machine (0.2 s in tests); it
    # turns SERVING at the latest one probe later.
    await wait_health(agent.address, SERVING)

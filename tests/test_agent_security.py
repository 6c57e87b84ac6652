"""TLS and mTLS on every hop: callers -> agent service -> state service, with
the agent's client certificate (or bearer token) as its tenant at the state
service."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent_service.client import AgentClient, AgentServiceError
from state_service.client import StateClient
from state_service.serving.tls import channel_credentials
from tests.certs import CertificateAuthority
from tests.conftest import AgentServerFactory, StateServerFactory

pytestmark = pytest.mark.usefixtures("redis_server")


async def test_mtls_on_both_hops(
    state_server_factory: StateServerFactory,
    agent_server_factory: AgentServerFactory,
    tmp_path: Path,
) -> None:
    ca = CertificateAuthority(tmp_path / "pki")
    state_cert = ca.issue("state-service", server=True)
    state = await state_server_factory(
        auth="mtls",
        tls_cert_file=state_cert.cert,
        tls_key_file=state_cert.key,
        tls_client_ca_file=ca.cert_file,
    )
    agent_cert = ca.issue("agent-service", server=True)
    agent_identity = ca.issue("team-a")  # the agent's tenant at the state service
    agent = await agent_server_factory(
        state_target=state.address,
        tls_cert_file=agent_cert.cert,
        tls_key_file=agent_cert.key,
        tls_client_ca_file=ca.cert_file,
        state_tls_ca_file=ca.cert_file,
        state_tls_cert_file=agent_identity.cert,
        state_tls_key_file=agent_identity.key,
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

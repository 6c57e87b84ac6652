"""Authentication, tenant isolation and TLS / mTLS (with certificate reload)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared_runtime.tls import channel_credentials
from state_service.client import (
    InvalidRequestError,
    SessionNotFoundError,
    StateClient,
    StateServiceError,
)
from state_service.storage.embedded import EmbeddedRedis
from statecar.state.v1 import state_service_pb2 as pb
from statecar.state.v1 import state_service_pb2_grpc as pb_grpc
from tests.certs import CertificateAuthority
from tests.conftest import StateServerFactory
from tests.helpers import SERVING, health_status
from tests.threaded import threaded_state_server

SESSION_IDS = st.from_regex(r"[A-Za-z0-9._:@=-]{1,40}", fullmatch=True)


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text("# tenant:token\nalpha:token-alpha\nbeta:token-beta\n")
    return path


async def test_missing_or_bad_token_is_unauthenticated(
    state_server_factory: StateServerFactory, tokens_file: Path
) -> None:
    server = await state_server_factory(auth="token", auth_tokens_file=tokens_file)
    for token in (None, "wrong"):
        async with StateClient(server.address, bearer_token=token) as client:
            with pytest.raises(StateServiceError) as raised:
                await client.append_items("s", [{"role": "user", "content": "x"}])
            assert raised.value.code == grpc.StatusCode.UNAUTHENTICATED
            assert raised.value.reason in ("UNAUTHENTICATED", "INVALID_TOKEN")
    # Probes need no credentials.
    assert await health_status(server.address) == SERVING
    async with StateClient(server.address, bearer_token="token-alpha") as client:
        await client.append_items("s", [{"role": "user", "content": "x"}])
        assert (await client.get_session("s")).item_count == 1


async def test_tokens_rotate_without_restart(
    state_server_factory: StateServerFactory, tokens_file: Path
) -> None:
    server = await state_server_factory(auth="token", auth_tokens_file=tokens_file)
    async with StateClient(server.address, bearer_token="token-beta") as beta:
        await beta.list_sessions()  # a known token, remembered as matched
    tokens_file.write_text("alpha:token-alpha-2\n")
    async with StateClient(server.address, bearer_token="token-alpha-2") as client:
        for _ in range(50):  # the file is re-checked at most once a second
            try:
                await client.list_sessions()
                break
            except StateServiceError:
                await asyncio.sleep(0.1)
        await client.list_sessions()
    async with StateClient(server.address, bearer_token="token-beta") as revoked:
        with pytest.raises(StateServiceError) as raised:
            await revoked.list_sessions()
        assert raised.value.code == grpc.StatusCode.UNAUTHENTICATED


@pytest.fixture
def two_tenants(redis_server: EmbeddedRedis, tokens_file: Path):  # type: ignore[no-untyped-def]
    with (
        threaded_state_server(
            redis_server.url, auth="token", auth_tokens_file=tokens_file
        ) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        stub = pb_grpc.StateServiceStub(channel)
        yield stub, redis_server


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(session_id=SESSION_IDS, content=st.text(max_size=50))
def test_tenants_never_see_each_other(two_tenants, session_id: str, content: str) -> None:  # type: ignore[no-untyped-def]
    stub, _ = two_tenants
    alpha = (("authorization", "Bearer token-alpha"),)
    beta = (("authorization", "Bearer token-beta"),)
    marker = json.dumps({"c": content, "id": session_id})
    item = pb.Item(json=json.dumps({"role": "user", "content": marker}))
    written = stub.AppendItems(
        pb.AppendItemsRequest(session_id=session_id, items=[item]), metadata=alpha
    )
    # Beta reads, lists, pops, updates and deletes the same id: sees nothing of alpha's.
    context = stub.GetContext(pb.GetContextRequest(session_id=session_id), metadata=beta)
    assert all(i.json != item.json for i in context.items)
    listed = stub.ListItems(pb.ListItemsRequest(session_id=session_id), metadata=beta)
    assert all(i.json != item.json for i in listed.items)
    sessions = stub.ListSessions(pb.ListSessionsRequest(page_size=1000), metadata=beta)
    assert all(s.etag != written.etag for s in sessions.sessions)
    for call in (
        lambda: stub.GetSession(pb.GetSessionRequest(session_id=session_id), metadata=beta),
        lambda: stub.DeleteSession(
            pb.DeleteSessionRequest(session_id=session_id, etag=written.etag), metadata=beta
        ),
        lambda: stub.AppendItems(
            pb.AppendItemsRequest(session_id=session_id, items=[item], etag=written.etag),
            metadata=beta,
        ),
    ):
        try:
            call()  # type: ignore[no-untyped-call]
        except grpc.RpcError as error:
            code = error.code()
            assert code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ABORTED)
    popped = stub.PopItem(pb.PopItemRequest(session_id=session_id), metadata=beta)
    assert popped.item.json != item.json
    # Alpha's session is untouched by all of that.
    mine = stub.ListItems(
        pb.ListItemsRequest(session_id=session_id, order=pb.ITEM_ORDER_NEWEST_FIRST),
        metadata=alpha,
    )
    assert mine.items[0].json == item.json
    assert mine.etag == written.etag


async def test_workflows_are_per_tenant(
    state_server_factory: StateServerFactory, tokens_file: Path
) -> None:
    server = await state_server_factory(auth="token", auth_tokens_file=tokens_file)
    async with (
        StateClient(server.address, bearer_token="token-alpha") as alpha,
        StateClient(server.address, bearer_token="token-beta") as beta,
    ):
        await alpha.update_workflow("wf", current_stage="a", results={}, agent_sessions={})
        with pytest.raises(SessionNotFoundError):
            await beta.get_workflow("wf")
        with pytest.raises(SessionNotFoundError):
            await beta.delete_workflow("wf")
        assert (await alpha.get_workflow("wf")).current_stage == "a"


async def test_mtls_maps_client_certificate_to_tenant(
    state_server_factory: StateServerFactory, tmp_path: Path
) -> None:
    ca = CertificateAuthority(tmp_path / "pki")
    server_cert = ca.issue("state-service", server=True)
    server = await state_server_factory(
        auth="mtls",
        tls_cert_file=server_cert.cert,
        tls_key_file=server_cert.key,
        tls_client_ca_file=ca.cert_file,
    )
    alpha_cert, beta_cert = ca.issue("alpha"), ca.issue("beta")

    def client(issued: object | None) -> StateClient:
        cert = getattr(issued, "cert", None)
        key = getattr(issued, "key", None)
        return StateClient(
            server.address, credentials=channel_credentials(ca.cert_file, cert, key), timeout=3
        )

    async with client(alpha_cert) as alpha, client(beta_cert) as beta:
        await alpha.append_items("s", [{"role": "user", "content": "alpha's"}])
        assert (await alpha.get_session("s")).item_count == 1
        assert (await beta.get_context("s")).items == []
    async with client(None) as anonymous:
        with pytest.raises(StateServiceError) as raised:
            await anonymous.list_sessions()
        assert raised.value.code == grpc.StatusCode.UNAVAILABLE  # handshake refused


async def test_server_certificate_reloads_on_change(
    state_server_factory: StateServerFactory, tmp_path: Path
) -> None:
    old_ca = CertificateAuthority(tmp_path / "old", name="old-ca")
    new_ca = CertificateAuthority(tmp_path / "new", name="new-ca")
    live = old_ca.issue("state-service", server=True, filename="live")
    server = await state_server_factory(tls_cert_file=live.cert, tls_key_file=live.key)
    async with StateClient(
        server.address, credentials=channel_credentials(old_ca.cert_file), timeout=3
    ) as old_trust:
        await old_trust.list_sessions()
    rotated = new_ca.issue("state-service", server=True, filename="rotated")
    live.cert.write_bytes(rotated.cert.read_bytes())
    live.key.write_bytes(rotated.key.read_bytes())
    async with StateClient(
        server.address, credentials=channel_credentials(new_ca.cert_file), timeout=3
    ) as new_trust:
        await new_trust.list_sessions()  # a new handshake sees the new certificate


async def test_only_delegates_act_for_other_tenants(
    state_server_factory: StateServerFactory, tokens_file: Path
) -> None:
    server = await state_server_factory(
        auth="token", auth_tokens_file=tokens_file, auth_delegates="alpha"
    )
    address, item = server.address, [{"role": "user", "content": "x"}]
    async with (
        StateClient(address, bearer_token="token-alpha") as alpha,
        StateClient(address, bearer_token="token-alpha", acting_for=lambda: "carol") as carol,
        StateClient(address, bearer_token="token-beta", acting_for=lambda: "carol") as beta,
        StateClient(address, bearer_token="token-alpha", acting_for=lambda: "No Tenant") as bad,
    ):
        await carol.check_delegation()
        await carol.append_items("s", item)
        assert await alpha.all_items("s") == []  # the delegate's own tenant is apart
        with pytest.raises(StateServiceError) as denied:
            await beta.append_items("s", item)
        assert denied.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert denied.value.reason == "NOT_A_DELEGATE"
        with pytest.raises(InvalidRequestError):
            await bad.append_items("s", item)
        assert len(await carol.all_items("s")) == 1  # the refused calls wrote nothing


async def test_delegation_without_authentication_is_opt_in(
    state_server_factory: StateServerFactory,
) -> None:
    item = [{"role": "user", "content": "x"}]
    ignoring = await state_server_factory()
    async with StateClient(ignoring.address, acting_for=lambda: "carol") as carol:
        with pytest.raises(StateServiceError) as ignored:
            await carol.check_delegation()
        assert ignored.value.reason == "DELEGATION_IGNORED"
    trusting = await state_server_factory(auth_delegates="default")
    async with (
        StateClient(trusting.address, acting_for=lambda: "carol") as carol,
        StateClient(trusting.address) as anyone,
    ):
        await carol.check_delegation()
        await carol.append_items("s", item)
        assert await anyone.all_items("s") == []
        assert len(await carol.all_items("s")) == 1

"""StateClient: the async, typed client of every StateService RPC."""

from __future__ import annotations

import ipaddress
import json
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import timedelta
from types import TracebackType
from typing import Any, TypeVar

import grpc
from google.protobuf import duration_pb2, field_mask_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared_runtime.auth import TENANT_METADATA_KEY
from shared_runtime.channels import reachable as channel_reachable
from state_service.client.errors import StateServiceError, StateUnavailableError, from_rpc_error
from state_service.client.types import (
    AppendResult,
    ClaimedRun,
    CompactedView,
    CompactResult,
    Context,
    EraseResult,
    ForkResult,
    ItemRecord,
    ItemsPage,
    NewItem,
    PausedRun,
    PendingApproval,
    PopResult,
    SessionInfo,
    SessionsPage,
    StoredItem,
    TierShares,
    WorkflowInfo,
    strategy_to_proto,
)
from statecar.state.v1 import state_service_pb2 as pb
from statecar.state.v1 import state_service_pb2_grpc as pb_grpc

R = TypeVar("R")

SERVICE = "statecar.state.v1.StateService"


def service_config(service: str, *, max_attempts: int, initial_backoff: str) -> str:
    """Balance every request over all resolved addresses, and let gRPC itself
    retry UNAVAILABLE (statecar's writes are safe to retry: the clients always
    send a request_id)."""
    return json.dumps(
        {
            "loadBalancingConfig": [{"round_robin": {}}],
            "methodConfig": [
                {
                    "name": [{"service": service}],
                    "retryPolicy": {
                        "maxAttempts": max_attempts,
                        "initialBackoff": initial_backoff,
                        "maxBackoff": "1s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ],
        }
    )


SERVICE_CONFIG = service_config(SERVICE, max_attempts=5, initial_backoff="0.05s")


def channel_target(target: str | Sequence[str]) -> str:
    """One gRPC target for one address, a DNS name or a list of IP replicas.

    "host:port" becomes "dns:///host:port" (all A/AAAA records, round robin);
    a list of "ip:port" becomes an ipv4:/ipv6: target of all of them.
    """
    if isinstance(target, str):
        if "," in target:
            return channel_target([t.strip() for t in target.split(",") if t.strip()])
        if ":///" in target or target.startswith(("ipv4:", "ipv6:", "unix:")):
            return target
        return f"dns:///{target}"
    addresses = list(target)
    if len(addresses) == 1:
        return channel_target(addresses[0])
    families = set()
    for address in addresses:
        host = address.rpartition(":")[0].strip("[]")
        try:
            families.add(ipaddress.ip_address(host).version)
        except ValueError:
            raise ValueError(
                f"{address!r}: a list of replicas must be IP:port; "
                "for host names use one DNS name that resolves to all replicas"
            ) from None
    if len(families) != 1:
        raise ValueError("a list of replicas must be all IPv4 or all IPv6")
    return f"ipv{families.pop()}:{','.join(addresses)}"


def _items(items: Sequence[Mapping[str, Any] | NewItem | pb.Item]) -> list[pb.Item]:
    return [
        item
        if isinstance(item, pb.Item)
        else (item if isinstance(item, NewItem) else NewItem(item)).to_proto()
        for item in items
    ]


class StateClient:
    """Async client of the state service.

    Every call has a deadline (`timeout`, overridable per call). `bearer_token`
    authenticates as a tenant; a delegate (see shared_runtime.auth)
    passes `acting_for`, called per call for the tenant to act for;
    `credentials` (see shared_runtime.tls.channel_credentials) turns
    on TLS / mTLS. Writes carry a request_id (generated when not given), so
    gRPC's automatic retries of UNAVAILABLE never apply a write twice.
    Failures raise StateServiceError subclasses. Use as `async with StateClient(...) as client:`.
    """

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        timeout: float = 5.0,
        bearer_token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        options: Sequence[tuple[str, Any]] = (),
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
        channel: grpc.aio.Channel | None = None,
        acting_for: Callable[[], str] | None = None,
    ) -> None:
        self.timeout = timeout
        self._metadata = tuple(metadata)
        self._acting_for = acting_for
        if bearer_token is not None:
            self._metadata += (("authorization", f"Bearer {bearer_token}"),)
        if channel is None:
            channel_options = [
                ("grpc.service_config", SERVICE_CONFIG),
                ("grpc.enable_retries", 1),
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                ("grpc.keepalive_time_ms", 30_000),
                *options,
            ]
            resolved = channel_target(target)
            if credentials is None:
                channel = grpc.aio.insecure_channel(
                    resolved, options=channel_options, interceptors=interceptors
                )
            else:
                channel = grpc.aio.secure_channel(
                    resolved, credentials, options=channel_options, interceptors=interceptors
                )
        self._channel = channel
        self._stub = pb_grpc.StateServiceStub(channel)
        # The health stubs are untyped in types-grpcio-health-checking.
        self._health: Any = health_pb2_grpc.HealthStub(channel)

    async def __aenter__(self) -> StateClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def reachable(self, timeout: float) -> bool:
        """Whether the service's address accepts a connection within `timeout`."""
        return await channel_reachable(self._channel, timeout)

    async def close(self) -> None:
        await self._channel.close()

    async def _call(
        self,
        method: Callable[..., Awaitable[R]],
        request: Any,
        timeout: float | None,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> R:
        if metadata is None:
            metadata = self._metadata
            if self._acting_for is not None:
                metadata = (*metadata, (TENANT_METADATA_KEY, self._acting_for()))
        try:
            return await method(
                request,
                timeout=self.timeout if timeout is None else timeout,
                metadata=metadata,
            )
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from error

    async def check_ready(self, *, timeout: float | None = None) -> None:
        """Raises StateUnavailableError unless the state service reports SERVING
        (grpc.health.v1: reachable, Redis reachable, not draining)."""
        request = health_pb2.HealthCheckRequest(service=SERVICE)
        response = await self._call(self._health.Check, request, timeout)
        if response.status != health_pb2.HealthCheckResponse.SERVING:
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
            raise StateUnavailableError(
                grpc.StatusCode.UNAVAILABLE,
                f"the state service reports {status}",
                "NOT_SERVING",
                {},
            )

    async def check_delegation(self, *, timeout: float | None = None) -> None:
        """Raises StateServiceError unless the state service honours this
        client's statecar-tenant metadata (AuthInterceptor with this client's
        identity among its delegates). Without it, every tenant the client acts
        for would silently share the client's own tenant."""
        request = pb.GetSessionRequest(session_id="statecar-delegation-check")
        invalid_tenant = (*self._metadata, (TENANT_METADATA_KEY, "-"))
        try:
            await self._call(self._stub.GetSession, request, timeout, invalid_tenant)
        except StateServiceError as refused:
            if refused.metadata.get("field") == f"{TENANT_METADATA_KEY} metadata":
                return  # the metadata was read and checked: delegation works
            if refused.code != grpc.StatusCode.NOT_FOUND:
                raise
        raise StateServiceError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"the state service ignores {TENANT_METADATA_KEY} metadata, so every tenant "
            "acted for would share this client's own; list this client's identity in "
            "STATE_SERVICE_AUTH_DELEGATES",
            "DELEGATION_IGNORED",
            {},
        )

    # -- the log --------------------------------------------------------------

    async def append_items(
        self,
        session_id: str,
        items: Sequence[Mapping[str, Any] | NewItem | pb.Item],
        *,
        request_id: str | None = None,
        etag: str = "",
        timeout: float | None = None,
    ) -> AppendResult:
        """Appends items (dicts, NewItems, or pb.Items already encoded)."""
        request = pb.AppendItemsRequest(
            session_id=session_id,
            items=_items(items),
            request_id=request_id if request_id is not None else uuid.uuid4().hex,
            etag=etag,
        )
        response = await self._call(self._stub.AppendItems, request, timeout)
        return AppendResult(
            response.etag,
            response.first_seq,
            response.last_seq,
            replayed=response.replayed,
            log_token_count=response.log_token_count,
        )

    async def get_context(
        self,
        session_id: str,
        *,
        query: str = "",
        token_budget: int = 0,
        strategy: str | None = None,
        tier_shares: TierShares | None = None,
        max_items: int = 0,
        timeout: float | None = None,
    ) -> Context:
        """What to send the model next. `strategy`: sliding_window, token_window,
        summary, retrieval or tiered (None: the session's, else the service
        default); `query` defaults to the newest user message."""
        request = pb.GetContextRequest(
            session_id=session_id,
            query=query,
            token_budget=token_budget,
            strategy=strategy_to_proto(strategy),
            max_items=max_items,
        )
        if tier_shares is not None:
            request.tier_shares.CopyFrom(tier_shares.to_proto())
        return Context.from_proto(await self._call(self._stub.GetContext, request, timeout))

    async def list_items(
        self,
        session_id: str,
        *,
        page_size: int = 0,
        page_token: str = "",
        newest_first: bool = False,
        timeout: float | None = None,
    ) -> ItemsPage:
        request = pb.ListItemsRequest(
            session_id=session_id,
            page_size=page_size,
            page_token=page_token,
            order=pb.ITEM_ORDER_NEWEST_FIRST if newest_first else pb.ITEM_ORDER_OLDEST_FIRST,
        )
        response = await self._call(self._stub.ListItems, request, timeout)
        return ItemsPage(
            items=StoredItem.all_from_proto(response.items),
            next_page_token=response.next_page_token,
            etag=response.etag,
            total_item_count=response.total_item_count,
        )

    async def all_items(self, session_id: str, *, page_size: int = 1000) -> list[StoredItem]:
        """The whole log, oldest first (pages through ListItems)."""
        items: list[StoredItem] = []
        token = ""
        while True:
            page = await self.list_items(session_id, page_size=page_size, page_token=token)
            items.extend(page.items)
            token = page.next_page_token
            if not token:
                return items

    async def pop_item(
        self,
        session_id: str,
        *,
        etag: str = "",
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> PopResult:
        request = pb.PopItemRequest(
            session_id=session_id,
            etag=etag,
            request_id=request_id if request_id is not None else uuid.uuid4().hex,
        )
        response = await self._call(self._stub.PopItem, request, timeout)
        item = StoredItem.from_proto(response.item) if response.HasField("item") else None
        return PopResult(item, response.etag)

    # -- sessions -------------------------------------------------------------

    async def get_session(self, session_id: str, *, timeout: float | None = None) -> SessionInfo:
        request = pb.GetSessionRequest(session_id=session_id)
        response = await self._call(self._stub.GetSession, request, timeout)
        return SessionInfo.from_proto(response.session)

    async def update_session(
        self,
        session_id: str,
        *,
        ttl: timedelta | None = None,
        persist: bool = False,
        context_strategy: str | None = None,
        tier_shares: TierShares | None = None,
        etag: str = "",
        allow_missing: bool = False,
        timeout: float | None = None,
    ) -> SessionInfo:
        """Sets the session's retention (`persist`, or `ttl`; None = service
        default) and, when given, its context strategy ("default" resets it)
        and budget shares. Retention is left alone when only compression
        settings are given."""
        settings = pb.SessionSettings(persist=persist)
        if ttl is not None:
            settings.ttl.CopyFrom(duration_pb2.Duration(seconds=int(ttl.total_seconds())))
        paths = []
        if context_strategy is not None:
            paths.append("context_strategy")
            if context_strategy != "default":
                settings.context_strategy = strategy_to_proto(context_strategy)
        if tier_shares is not None:
            paths.append("tier_shares")
            settings.tier_shares.CopyFrom(tier_shares.to_proto())
        if not paths or ttl is not None or persist:
            paths += ["ttl", "persist"]
        request = pb.UpdateSessionRequest(
            session_id=session_id,
            settings=settings,
            update_mask=field_mask_pb2.FieldMask(paths=paths),
            etag=etag,
            allow_missing=allow_missing,
        )
        response = await self._call(self._stub.UpdateSession, request, timeout)
        return SessionInfo.from_proto(response.session)

    async def delete_session(
        self,
        session_id: str,
        *,
        etag: str = "",
        allow_missing: bool = False,
        timeout: float | None = None,
    ) -> None:
        request = pb.DeleteSessionRequest(
            session_id=session_id, etag=etag, allow_missing=allow_missing
        )
        await self._call(self._stub.DeleteSession, request, timeout)

    async def fork_session(
        self,
        source_session_id: str,
        new_session_id: str,
        *,
        up_to_seq: int = 0,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> ForkResult:
        """Creates `new_session_id` from the items of `source_session_id` with
        seq <= up_to_seq (0: all of them), atomically; the source is not
        changed. Raises SessionAlreadyExistsError if the new session exists,
        SessionNotFoundError if the source does not."""
        request = pb.ForkSessionRequest(
            source_session_id=source_session_id,
            new_session_id=new_session_id,
            up_to_seq=up_to_seq,
            request_id=request_id if request_id is not None else uuid.uuid4().hex,
        )
        response = await self._call(self._stub.ForkSession, request, timeout)
        return ForkResult.from_proto(response)

    async def compact_session(
        self,
        session_id: str,
        items: Sequence[Mapping[str, Any] | NewItem],
        *,
        etag: str,
        keep_items: int = 0,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> CompactResult:
        """Stores a compacted view beside the log: the first `keep_items` items
        of the current view, then `items`; only if the session's etag is still
        `etag` (EtagMismatchError otherwise). The log is not changed."""
        request = pb.CompactSessionRequest(
            session_id=session_id,
            etag=etag,
            keep_items=keep_items,
            items=_items(items),
            request_id=request_id if request_id is not None else uuid.uuid4().hex,
        )
        response = await self._call(self._stub.CompactSession, request, timeout)
        return CompactResult(
            response.etag,
            response.view_item_count,
            response.compacted_up_to_seq,
            replayed=response.replayed,
        )

    async def put_paused_run(
        self,
        session_id: str,
        run_id: str,
        state: bytes,
        approvals: Sequence[PendingApproval],
        *,
        etag: str = "",
        timeout: float | None = None,
    ) -> tuple[PausedRun, bool]:
        """Stores a paused run if the session is still at `etag` ("" = any);
        returns it and whether `run_id` had been stored before."""
        request = pb.PutPausedRunRequest(
            session_id=session_id,
            etag=etag,
            run_id=run_id,
            state=state,
            approvals=[
                pb.PendingApproval(
                    approval_id=a.approval_id,
                    tool_name=a.tool_name,
                    arguments_json=a.arguments_json,
                    agent=a.agent,
                    call_id=a.call_id,
                )
                for a in approvals
            ],
        )
        response = await self._call(self._stub.PutPausedRun, request, timeout)
        return PausedRun.from_proto(response.run), response.replayed

    async def list_paused_runs(
        self, session_id: str, *, timeout: float | None = None
    ) -> list[PausedRun]:
        """The session's live paused runs, oldest first."""
        request = pb.ListPausedRunsRequest(session_id=session_id)
        response = await self._call(self._stub.ListPausedRuns, request, timeout)
        return [PausedRun.from_proto(run) for run in response.runs]

    async def claim_paused_run(
        self, session_id: str, run_id: str, claim_id: str, *, timeout: float | None = None
    ) -> ClaimedRun:
        """Takes a paused run for resumption (exactly one claim id ever does)."""
        request = pb.ClaimPausedRunRequest(session_id=session_id, run_id=run_id, claim_id=claim_id)
        response = await self._call(self._stub.ClaimPausedRun, request, timeout)
        return ClaimedRun(
            PausedRun.from_proto(response.run), response.state, response.resolved, response.held
        )

    async def resolve_paused_run(
        self,
        session_id: str,
        run_id: str,
        claim_id: str,
        result: bytes,
        *,
        timeout: float | None = None,
    ) -> PausedRun:
        """Marks a run claimed by `claim_id` resolved, keeping `result` for its retries."""
        request = pb.ResolvePausedRunRequest(
            session_id=session_id, run_id=run_id, claim_id=claim_id, result=result
        )
        response = await self._call(self._stub.ResolvePausedRun, request, timeout)
        return PausedRun.from_proto(response.run)

    async def get_compacted_view(
        self, session_id: str, *, max_items: int = 0, timeout: float | None = None
    ) -> CompactedView:
        """The session's compacted view (its newest `max_items` items; 0: all);
        `compacted` is False when it has none (its history is then the log)."""
        request = pb.GetCompactedViewRequest(session_id=session_id, max_items=max_items)
        response = await self._call(self._stub.GetCompactedView, request, timeout)
        return CompactedView(
            compacted=response.compacted,
            items=StoredItem.all_from_proto(response.items),
            total_item_count=response.total_item_count,
            compacted_up_to_seq=response.compacted_up_to_seq,
            etag=response.etag,
        )

    async def list_sessions(
        self, *, page_size: int = 0, page_token: str = "", timeout: float | None = None
    ) -> SessionsPage:
        request = pb.ListSessionsRequest(page_size=page_size, page_token=page_token)
        response = await self._call(self._stub.ListSessions, request, timeout)
        return SessionsPage(
            sessions=[SessionInfo.from_proto(s) for s in response.sessions],
            next_page_token=response.next_page_token,
        )

    # -- workflows ------------------------------------------------------------

    async def get_workflow(self, workflow_id: str, *, timeout: float | None = None) -> WorkflowInfo:
        request = pb.GetWorkflowRequest(workflow_id=workflow_id)
        response = await self._call(self._stub.GetWorkflow, request, timeout)
        return WorkflowInfo.from_proto(response.workflow)

    async def update_workflow(
        self,
        workflow_id: str,
        *,
        current_stage: str,
        results: Mapping[str, Any],
        agent_sessions: Mapping[str, str],
        etag: str = "",
        allow_missing: bool = True,
        timeout: float | None = None,
    ) -> WorkflowInfo:
        """Replaces the workflow's state; with `etag`, only if nobody changed it since."""
        workflow = pb.Workflow(
            workflow_id=workflow_id,
            current_stage=current_stage,
            results_json=json.dumps(results, ensure_ascii=False, separators=(",", ":")).encode(),
            agent_sessions=dict(agent_sessions),
        )
        request = pb.UpdateWorkflowRequest(
            workflow=workflow, etag=etag, allow_missing=allow_missing
        )
        response = await self._call(self._stub.UpdateWorkflow, request, timeout)
        return WorkflowInfo.from_proto(response.workflow)

    async def delete_workflow(
        self,
        workflow_id: str,
        *,
        etag: str = "",
        allow_missing: bool = False,
        timeout: float | None = None,
    ) -> None:
        request = pb.DeleteWorkflowRequest(
            workflow_id=workflow_id, etag=etag, allow_missing=allow_missing
        )
        await self._call(self._stub.DeleteWorkflow, request, timeout)

    # -- data portability ---------------------------------------------------------

    async def list_item_records(
        self,
        session_id: str,
        *,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> tuple[list[ItemRecord], str]:
        """One page of a session's items, oldest first, exactly as stored
        (see ItemRecord), and the next page's token ("" on the last)."""
        request = pb.ListItemsRequest(
            session_id=session_id, page_size=page_size, page_token=page_token
        )
        response = await self._call(self._stub.ListItems, request, timeout)
        return [ItemRecord.from_proto(i) for i in response.items], response.next_page_token

    async def import_items(
        self,
        session_id: str,
        items: Sequence[ItemRecord],
        *,
        request_id: str | None = None,
        etag: str = "",
        timeout: float | None = None,
    ) -> AppendResult:
        """Writes items keeping their seqs and create times (ImportItems): the
        first seq must be above the session's last_seq (EtagMismatchError with
        reason SEQ_CONFLICT otherwise)."""
        request = pb.ImportItemsRequest(
            session_id=session_id,
            items=[item.to_proto() for item in items],
            request_id=request_id if request_id is not None else uuid.uuid4().hex,
            etag=etag,
        )
        response = await self._call(self._stub.ImportItems, request, timeout)
        return AppendResult(
            response.etag, response.first_seq, response.last_seq, replayed=response.replayed
        )

    async def erase_session(self, session_id: str, *, timeout: float | None = None) -> EraseResult:
        """Erases everything kept about one session (see EraseSession)."""
        request = pb.EraseSessionRequest(session_id=session_id)
        response = await self._call(self._stub.EraseSession, request, timeout)
        return EraseResult(
            1 if response.existed else 0, response.deleted_key_count, response.durable_row_count
        )

    async def erase_tenant(self, tenant: str, *, timeout: float | None = 120.0) -> EraseResult:
        """Erases everything kept about the caller's tenant; `tenant` must be
        that tenant's id (a confirmation). An interrupted erase continues when
        called again."""
        request = pb.EraseTenantRequest(confirm_tenant=tenant)
        response = await self._call(self._stub.EraseTenant, request, timeout)
        return EraseResult(
            response.session_count, response.deleted_key_count, response.durable_row_count
        )

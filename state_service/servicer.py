"""Where StateService requests enter: validate, resolve the tenant, convert the
request to domain values (grpc_convert.py), call the business module that owns
the RPC, convert its result back. Domain errors leave as their status
(grpc_errors.py).

AppendItems, PopItem, GetSession, UpdateSession, DeleteSession: sessions.py.
GetContext: context.py. ListItems, ListSessions: listing.py. Workflows:
workflows.py. ForkSession: forks.py. CompactSession, GetCompactedView:
compaction.py. ImportItems: imports.py. EraseSession, EraseTenant: erasure.py.
"""

from __future__ import annotations

from typing import Any

from grpc.aio import ServicerContext

from shared_runtime.errors import InvalidArgument
from state_service import grpc_convert as convert
from state_service import validation
from state_service.compaction import CompactedViews
from state_service.compression.engine import Compression
from state_service.context import ContextLimits, ContextPipeline
from state_service.encryption import KeyRing
from state_service.erasure import DurableTier, Erasure
from state_service.forks import SessionForks
from state_service.grpc_errors import maps_domain_errors
from state_service.heavy_work import HeavyWork
from state_service.identity import tenant_of
from state_service.imports import ImportedItem, SessionImports
from state_service.listing import Listing
from state_service.paused_runs import Approval, PausedRunLimits, PausedRuns
from state_service.reader import LogReader
from state_service.sessions import SessionStore, SettingsUpdate
from state_service.settings import StateServiceSettings
from state_service.storage.redis import RedisStorage
from state_service.tokens import TokenCounter
from state_service.workflows import WorkflowStore
from statecar.state.v1 import state_service_pb2 as pb
from statecar.state.v1 import state_service_pb2_grpc as pb_grpc

Context = ServicerContext[Any, Any]
RETENTION_FIELDS = frozenset({"ttl", "persist"})
SETTINGS_FIELDS = RETENTION_FIELDS | {"context_strategy", "tier_shares"}


class StateServicer(pb_grpc.StateServiceServicer):
    def __init__(
        self,
        store: SessionStore,
        context: ContextPipeline,
        listing: Listing,
        workflows: WorkflowStore,
        settings: StateServiceSettings,
        forks: SessionForks,
        views: CompactedViews,
        paused: PausedRuns,
        imports: SessionImports,
        erasure: Erasure,
    ) -> None:
        self._store = store
        self._context = context
        self._listing = listing
        self._workflows = workflows
        self._settings = settings
        self._forks = forks
        self._views = views
        self._paused = paused
        self._imports = imports
        self._erasure = erasure

    @classmethod
    def over(
        cls,
        storage: RedisStorage,
        reader: LogReader,
        settings: StateServiceSettings,
        *,
        token_counter: TokenCounter,
        keys: KeyRing | None = None,
        compression: Compression | None = None,
        heavy: HeavyWork | None = None,
        durable: DurableTier | None = None,
    ) -> StateServicer:
        """The servicer with its business modules, over one storage and log
        reader (and the durable tier's erasure, when there is one)."""
        heavy = heavy or HeavyWork.unlimited()
        return cls(
            SessionStore(
                storage,
                reader,
                token_counter=token_counter,
                keys=keys,
                compression=compression,
                heavy=heavy,
            ),
            ContextPipeline(
                reader,
                compression,
                token_counter,
                ContextLimits(
                    settings.context_max_items,
                    settings.context_max_bytes,
                    settings.max_query_bytes,
                ),
                heavy,
            ),
            Listing(storage, reader, heavy),
            WorkflowStore(storage),
            settings,
            SessionForks(
                storage,
                token_counter=token_counter,
                max_items=settings.max_fork_items,
                keys=keys,
                compression=compression,
            ),
            CompactedViews(storage, keys=keys),
            PausedRuns(
                storage,
                PausedRunLimits(
                    settings.paused_run_ttl_seconds,
                    settings.max_paused_runs,
                    settings.max_paused_run_bytes,
                ),
                keys=keys,
            ),
            SessionImports(
                storage,
                token_counter=token_counter,
                keys=keys,
                compression=compression,
                heavy=heavy,
            ),
            Erasure(storage, reader, compression=compression, durable=durable),
        )

    @maps_domain_errors
    async def AppendItems(
        self, request: pb.AppendItemsRequest, context: Context
    ) -> pb.AppendItemsResponse:
        session_id = validation.session_id(request.session_id)
        new_items = convert.new_items(request.items)
        validation.items(new_items, self._settings)
        outcome = await self._store.append(
            tenant_of(context),
            session_id,
            new_items,
            request_id=validation.request_id(request.request_id),
            etag=validation.etag(request.etag),
        )
        return convert.append_response(outcome)

    @maps_domain_errors
    async def GetContext(
        self, request: pb.GetContextRequest, context: Context
    ) -> pb.GetContextResponse:
        session_id = validation.session_id(request.session_id)
        budget = validation.token_budget(request.token_budget, self._settings)
        strategy = validation.strategy(request.strategy, "strategy")
        shares = (
            validation.shares(request.tier_shares, "tier_shares")
            if request.HasField("tier_shares")
            else None
        )
        result = await self._context.get_context(
            tenant_of(context),
            session_id,
            token_budget=budget,
            query=validation.query(request.query, self._settings),
            strategy=strategy,
            shares=shares,
            # Clamped: the window a GetContext reads is bounded whatever it asks.
            max_items=min(
                validation.max_items(request.max_items), self._settings.context_max_items
            ),
        )
        return convert.context_response(result)

    @maps_domain_errors
    async def ListItems(
        self, request: pb.ListItemsRequest, context: Context
    ) -> pb.ListItemsResponse:
        session_id = validation.session_id(request.session_id)
        if request.order not in pb.ItemOrder.values():
            raise InvalidArgument("order", "is not a known ItemOrder")
        page = await self._listing.list_items(
            tenant_of(context),
            session_id,
            page_size=validation.page_size(request.page_size, self._settings),
            page_token=request.page_token,
            newest_first=request.order == pb.ITEM_ORDER_NEWEST_FIRST,
        )
        return convert.items_response(page)

    @maps_domain_errors
    async def PopItem(self, request: pb.PopItemRequest, context: Context) -> pb.PopItemResponse:
        session_id = validation.session_id(request.session_id)
        popped = await self._store.pop(
            tenant_of(context),
            session_id,
            request_id=validation.request_id(request.request_id),
            etag=validation.etag(request.etag),
        )
        return convert.pop_response(popped)

    @maps_domain_errors
    async def GetSession(
        self, request: pb.GetSessionRequest, context: Context
    ) -> pb.GetSessionResponse:
        session_id = validation.session_id(request.session_id)
        info = await self._store.get_session(tenant_of(context), session_id)
        return pb.GetSessionResponse(session=convert.session_message(info))

    @maps_domain_errors
    async def UpdateSession(
        self, request: pb.UpdateSessionRequest, context: Context
    ) -> pb.UpdateSessionResponse:
        session_id = validation.session_id(request.session_id)
        paths = {p.removeprefix("settings.") for p in request.update_mask.paths}
        unknown = paths - SETTINGS_FIELDS
        if unknown:
            raise InvalidArgument(
                "update_mask",
                f"unknown paths {sorted(unknown)}; known: {', '.join(sorted(SETTINGS_FIELDS))}",
            )
        everything = not paths
        strategy = None
        reset_strategy = False
        if everything or "context_strategy" in paths:
            strategy = validation.strategy(
                request.settings.context_strategy, "settings.context_strategy"
            )
            reset_strategy = strategy is None
        shares = None
        reset_shares = False
        if everything or "tier_shares" in paths:
            if request.settings.HasField("tier_shares"):
                shares = validation.shares(request.settings.tier_shares, "settings.tier_shares")
            else:
                reset_shares = True
        if (
            request.settings.persist
            and request.settings.HasField("ttl")
            and (request.settings.ttl.seconds or request.settings.ttl.nanos)
        ):
            raise InvalidArgument("settings", "set either ttl or persist, not both")
        # ttl and persist are one stored retention value, so a mask naming
        # either sets it from both fields: persist wins, else ttl (unset =
        # service default).
        ttl_setting = validation.ttl_seconds(request.settings, "settings")
        update = SettingsUpdate(
            ttl_setting=ttl_setting if everything or paths & RETENTION_FIELDS else None,
            strategy=strategy,
            reset_strategy=reset_strategy,
            shares=shares,
            reset_shares=reset_shares,
        )
        info = await self._store.update_session(
            tenant_of(context),
            session_id,
            update,
            etag=validation.etag(request.etag),
            allow_missing=request.allow_missing,
        )
        return pb.UpdateSessionResponse(session=convert.session_message(info))

    @maps_domain_errors
    async def DeleteSession(
        self, request: pb.DeleteSessionRequest, context: Context
    ) -> pb.DeleteSessionResponse:
        session_id = validation.session_id(request.session_id)
        await self._store.delete_session(
            tenant_of(context),
            session_id,
            etag=validation.etag(request.etag),
            allow_missing=request.allow_missing,
        )
        return pb.DeleteSessionResponse()

    @maps_domain_errors
    async def ListSessions(
        self, request: pb.ListSessionsRequest, context: Context
    ) -> pb.ListSessionsResponse:
        page = await self._listing.list_sessions(
            tenant_of(context),
            page_size=validation.page_size(request.page_size, self._settings),
            page_token=request.page_token,
        )
        return convert.sessions_response(page)

    @maps_domain_errors
    async def GetWorkflow(
        self, request: pb.GetWorkflowRequest, context: Context
    ) -> pb.GetWorkflowResponse:
        workflow_id = validation.session_id(request.workflow_id, "workflow_id")
        workflow = await self._workflows.get(tenant_of(context), workflow_id)
        return pb.GetWorkflowResponse(workflow=convert.workflow_message(workflow))

    @maps_domain_errors
    async def UpdateWorkflow(
        self, request: pb.UpdateWorkflowRequest, context: Context
    ) -> pb.UpdateWorkflowResponse:
        workflow = request.workflow
        validation.session_id(workflow.workflow_id, "workflow.workflow_id")
        if workflow.results_json:
            validation.json_object(
                workflow.results_json, "workflow.results_json", self._settings.max_item_bytes
            )
        if len(workflow.current_stage) > 256:
            raise InvalidArgument("workflow.current_stage", "must be at most 256 characters")
        for agent, session in workflow.agent_sessions.items():
            if not agent or len(agent) > 256:
                raise InvalidArgument(
                    "workflow.agent_sessions", "agent names must be 1 to 256 characters"
                )
            validation.session_id(session, f"workflow.agent_sessions[{agent!r}]")
        updated = await self._workflows.update(
            tenant_of(context),
            convert.workflow_of(workflow),
            etag=validation.etag(request.etag),
            allow_missing=request.allow_missing,
        )
        return pb.UpdateWorkflowResponse(workflow=convert.workflow_message(updated))

    @maps_domain_errors
    async def DeleteWorkflow(
        self, request: pb.DeleteWorkflowRequest, context: Context
    ) -> pb.DeleteWorkflowResponse:
        workflow_id = validation.session_id(request.workflow_id, "workflow_id")
        await self._workflows.delete(
            tenant_of(context),
            workflow_id,
            etag=validation.etag(request.etag),
            allow_missing=request.allow_missing,
        )
        return pb.DeleteWorkflowResponse()

    @maps_domain_errors
    async def ForkSession(
        self, request: pb.ForkSessionRequest, context: Context
    ) -> pb.ForkSessionResponse:
        source_id = validation.session_id(request.source_session_id, "source_session_id")
        new_id = validation.session_id(request.new_session_id, "new_session_id")
        if request.up_to_seq < 0:
            raise InvalidArgument("up_to_seq", "must not be negative (0 = every item)")
        result = await self._forks.fork(
            tenant_of(context),
            source_id,
            new_id,
            up_to_seq=request.up_to_seq,
            request_id=validation.request_id(request.request_id),
        )
        return pb.ForkSessionResponse(
            session=convert.session_message(result.session),
            copied_item_count=result.copied,
            up_to_seq=result.up_to_seq,
            replayed=result.replayed,
        )

    @maps_domain_errors
    async def CompactSession(
        self, request: pb.CompactSessionRequest, context: Context
    ) -> pb.CompactSessionResponse:
        session_id = validation.session_id(request.session_id)
        etag = validation.etag(request.etag)
        if not etag:
            raise InvalidArgument("etag", "is required: the etag the compaction was computed from")
        if request.keep_items < 0:
            raise InvalidArgument("keep_items", "must not be negative")
        new_items = convert.new_items(request.items)
        validation.items(new_items, self._settings)
        outcome = await self._views.compact(
            tenant_of(context),
            session_id,
            new_items,
            etag=etag,
            keep_items=request.keep_items,
            request_id=validation.request_id(request.request_id),
        )
        return pb.CompactSessionResponse(
            etag=outcome.etag,
            view_item_count=outcome.count,
            compacted_up_to_seq=outcome.up_to_seq,
            replayed=outcome.replayed,
        )

    @maps_domain_errors
    async def GetCompactedView(
        self, request: pb.GetCompactedViewRequest, context: Context
    ) -> pb.GetCompactedViewResponse:
        session_id = validation.session_id(request.session_id)
        view = await self._views.read(
            tenant_of(context), session_id, max_items=validation.max_items(request.max_items)
        )
        return pb.GetCompactedViewResponse(
            compacted=view.compacted,
            items=[convert.item_message(item) for item in view.items],
            total_item_count=view.total,
            compacted_up_to_seq=view.up_to_seq,
            etag=view.etag,
        )

    # -- paused runs (tool approvals; see paused_runs.py) ----------------------

    @maps_domain_errors
    async def PutPausedRun(
        self, request: pb.PutPausedRunRequest, context: Context
    ) -> pb.PutPausedRunResponse:
        session_id = validation.session_id(request.session_id)
        run_id = validation.run_id(request.run_id, "run_id")
        if not request.state:
            raise InvalidArgument("state", "is required")
        if not request.approvals:
            raise InvalidArgument("approvals", "needs at least one pending approval")
        approvals = [
            Approval(a.approval_id, a.tool_name, a.arguments_json, a.agent, a.call_id)
            for a in request.approvals
        ]
        if any(not a.approval_id for a in approvals):
            raise InvalidArgument("approvals", "every approval needs an approval_id")
        info, replayed = await self._paused.put(
            tenant_of(context),
            session_id,
            run_id,
            etag=validation.etag(request.etag),
            state=request.state,
            approvals=approvals,
        )
        return pb.PutPausedRunResponse(run=convert.paused_run_message(info), replayed=replayed)

    @maps_domain_errors
    async def ListPausedRuns(
        self, request: pb.ListPausedRunsRequest, context: Context
    ) -> pb.ListPausedRunsResponse:
        session_id = validation.session_id(request.session_id)
        runs = await self._paused.list(tenant_of(context), session_id)
        return pb.ListPausedRunsResponse(runs=[convert.paused_run_message(r) for r in runs])

    @maps_domain_errors
    async def ClaimPausedRun(
        self, request: pb.ClaimPausedRunRequest, context: Context
    ) -> pb.ClaimPausedRunResponse:
        session_id = validation.session_id(request.session_id)
        run_id = validation.run_id(request.run_id, "run_id")
        claim_id = validation.run_id(request.claim_id, "claim_id")
        claimed = await self._paused.claim(tenant_of(context), session_id, run_id, claim_id)
        return pb.ClaimPausedRunResponse(
            run=convert.paused_run_message(claimed.run),
            state=claimed.body,
            resolved=claimed.resolved,
            held=claimed.held,
        )

    @maps_domain_errors
    async def ResolvePausedRun(
        self, request: pb.ResolvePausedRunRequest, context: Context
    ) -> pb.ResolvePausedRunResponse:
        session_id = validation.session_id(request.session_id)
        run_id = validation.run_id(request.run_id, "run_id")
        claim_id = validation.run_id(request.claim_id, "claim_id")
        info = await self._paused.resolve(
            tenant_of(context), session_id, run_id, claim_id, request.result
        )
        return pb.ResolvePausedRunResponse(run=convert.paused_run_message(info))

    @maps_domain_errors
    async def ImportItems(
        self, request: pb.ImportItemsRequest, context: Context
    ) -> pb.ImportItemsResponse:
        session_id = validation.session_id(request.session_id)
        new_items = convert.new_items(request.items)
        validation.items(new_items, self._settings)
        imported = [
            ImportedItem(
                message.seq,
                convert.create_ms(message),
                item,
            )
            for message, item in zip(request.items, new_items, strict=True)
        ]
        outcome = await self._imports.import_items(
            tenant_of(context),
            session_id,
            imported,
            request_id=validation.request_id(request.request_id),
            etag=validation.etag(request.etag),
        )
        return pb.ImportItemsResponse(
            etag=outcome.etag,
            first_seq=outcome.first_seq,
            last_seq=outcome.last_seq,
            replayed=outcome.replayed,
        )

    @maps_domain_errors
    async def EraseSession(
        self, request: pb.EraseSessionRequest, context: Context
    ) -> pb.EraseSessionResponse:
        session_id = validation.session_id(request.session_id)
        erased = await self._erasure.erase_session(tenant_of(context), session_id)
        return pb.EraseSessionResponse(
            existed=erased.existed,
            deleted_key_count=erased.deleted_keys,
            durable_row_count=erased.durable_rows,
        )

    @maps_domain_errors
    async def EraseTenant(
        self, request: pb.EraseTenantRequest, context: Context
    ) -> pb.EraseTenantResponse:
        tenant = tenant_of(context)
        if request.confirm_tenant != tenant:
            raise InvalidArgument(
                "confirm_tenant", "must be the caller's own tenant id (a confirmation)"
            )
        erased = await self._erasure.erase_tenant(tenant)
        return pb.EraseTenantResponse(
            session_count=erased.sessions,
            deleted_key_count=erased.deleted_keys,
            durable_row_count=erased.durable_rows,
        )

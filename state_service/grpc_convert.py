"""Between the API's messages and the service's domain types, both ways.

The servicer and this module are the only code that sees ``pb.*`` messages:
business modules take and return domain dataclasses (log.py, context.py,
sessions.py, listing.py, workflows.py), storage stores its own formats. So a
change to the API is a change here, never a migration of stored data.

Two conversions sit on the hot path and are built once: an item's message is
kept with the (immutable, cached) item, and a context result shared by
requests of the same shape keeps its response, served as a copy (a copy costs
a fraction of building the message again).
"""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf import duration_pb2, timestamp_pb2

from state_service.compression.strategies import Shares, Strategy
from state_service.context import ContextResult
from state_service.listing import ItemsPage, SessionsPage
from state_service.log import Item, NewItem
from state_service.paused_runs import PausedRunInfo
from state_service.sessions import Popped, SessionInfo
from state_service.storage.redis import AppendOutcome, PausedStatus
from state_service.workflows import Workflow
from statecar.state.v1 import state_service_pb2 as pb

STRATEGY_OF_PROTO: dict[pb.ContextStrategy.ValueType, Strategy] = {
    pb.CONTEXT_STRATEGY_SLIDING_WINDOW: Strategy.SLIDING_WINDOW,
    pb.CONTEXT_STRATEGY_TOKEN_WINDOW: Strategy.TOKEN_WINDOW,
    pb.CONTEXT_STRATEGY_SUMMARY: Strategy.SUMMARY,
    pb.CONTEXT_STRATEGY_RETRIEVAL: Strategy.RETRIEVAL,
    pb.CONTEXT_STRATEGY_TIERED: Strategy.TIERED,
}
PROTO_OF_STRATEGY = {strategy: number for number, strategy in STRATEGY_OF_PROTO.items()}

_MESSAGE = "pb"  # the key of a built message in a domain object's `rendered`


def timestamp(ms: int) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromMilliseconds(ms)
    return ts


# -- items --------------------------------------------------------------------


def new_items(items: Sequence[pb.Item]) -> list[NewItem]:
    """Items to append (their seq and create_time are the log's to assign)."""
    return [
        NewItem(item.json.encode(), dict(item.metadata))
        if not item.speaker and not item.HasField("original_time")
        else NewItem(
            item.json.encode(),
            dict(item.metadata),
            original_ms=original_ms(item),
            speaker=item.speaker,
        )
        for item in items
    ]


def original_ms(item: pb.Item) -> int:
    """The item's original_time in ms (0: not given); -1 for a time before
    1970, which validation refuses (0 would read as "not given")."""
    if not item.HasField("original_time"):
        return 0
    ms = item.original_time.ToMilliseconds()
    return ms if ms > 0 else -1


def create_ms(item: pb.Item) -> int:
    """An imported item's create_time in ms (0: not given, -1: before 1970)."""
    if not item.HasField("create_time"):
        return 0
    ms = item.create_time.ToMilliseconds()
    return ms if ms > 0 else -1


def item_message(item: Item) -> pb.Item:
    """The item's message, built once per item (callers copy it into theirs)."""
    message: pb.Item | None = item.rendered.get(_MESSAGE)
    if message is None:
        message = pb.Item(seq=item.seq, json=item.json.decode())
        if item.metadata:
            message.metadata.update(item.metadata)
        if item.create_ms:
            created = message.create_time
            created.seconds, millis = divmod(item.create_ms, 1000)
            created.nanos = millis * 1_000_000
        if item.original_ms:
            original = message.original_time
            original.seconds, millis = divmod(item.original_ms, 1000)
            original.nanos = millis * 1_000_000
        if item.speaker:
            message.speaker = item.speaker
        item.rendered[_MESSAGE] = message
    return message


def append_response(outcome: AppendOutcome) -> pb.AppendItemsResponse:
    return pb.AppendItemsResponse(
        etag=outcome.etag,
        first_seq=outcome.first_seq,
        last_seq=outcome.last_seq,
        replayed=outcome.replayed,
        log_token_count=max(outcome.log_tokens, 0),
    )


def pop_response(popped: Popped) -> pb.PopItemResponse:
    response = pb.PopItemResponse(etag=popped.etag)
    if popped.item is not None:
        response.item.CopyFrom(item_message(popped.item))
    return response


def items_response(page: ItemsPage) -> pb.ListItemsResponse:
    return pb.ListItemsResponse(
        items=[item_message(item) for item in page.items],
        next_page_token=page.next_page_token,
        etag=page.etag,
        total_item_count=page.total_item_count,
    )


# -- context ------------------------------------------------------------------


def context_response(result: ContextResult) -> pb.GetContextResponse:
    shared = result.rendered
    if shared is not None:
        prepared: pb.GetContextResponse | None = shared.get(_MESSAGE)
        if prepared is not None:
            response = pb.GetContextResponse()
            response.CopyFrom(prepared)
            return response
    response = pb.GetContextResponse(
        items=[item_message(e.item) for e in result.recent],
        etag=result.etag,
        token_count=result.token_count,
        token_budget=result.token_budget,
        total_item_count=result.total_item_count,
        omitted_item_count=result.omitted_item_count,
        strategy=PROTO_OF_STRATEGY[result.strategy],
        query=result.query,
        summary_lag=result.view.summary_lag,
        retrieved_items=[
            pb.RetrievedItem(item=item_message(e.item), score=s) for e, s in result.retrieved
        ],
    )
    summary = result.summary
    if summary is not None:
        response.summary.CopyFrom(
            pb.ContextSummary(
                text=summary.text,
                first_seq=summary.first_seq,
                last_seq=summary.last_seq,
                token_count=summary.tokens,
            )
        )
    if shared is not None:
        prepared = pb.GetContextResponse()
        prepared.CopyFrom(response)
        shared[_MESSAGE] = prepared
    return response


# -- sessions -----------------------------------------------------------------


def session_message(info: SessionInfo) -> pb.Session:
    session = pb.Session(
        session_id=info.session_id,
        item_count=info.item_count,
        last_seq=info.last_seq,
        etag=info.etag,
        create_time=timestamp(info.create_ms),
        update_time=timestamp(info.update_ms),
    )
    if info.persist:
        session.settings.persist = True
    if info.ttl_seconds is not None:
        session.settings.ttl.CopyFrom(duration_pb2.Duration(seconds=info.ttl_seconds))
    if info.effective_ttl_seconds is not None:
        session.effective_ttl.CopyFrom(duration_pb2.Duration(seconds=info.effective_ttl_seconds))
    if info.expire_ms is not None:
        session.expire_time.CopyFrom(timestamp(info.expire_ms))
    if info.strategy is not None:
        session.settings.context_strategy = PROTO_OF_STRATEGY[info.strategy]
    if info.shares is not None:
        session.settings.tier_shares.CopyFrom(shares_message(info.shares))
    return session


def shares_message(shares: Shares) -> pb.TierShares:
    return pb.TierShares(recent=shares.recent, summary=shares.summary, retrieval=shares.retrieval)


def sessions_response(page: SessionsPage) -> pb.ListSessionsResponse:
    return pb.ListSessionsResponse(
        sessions=[session_message(info) for info in page.sessions],
        next_page_token=page.next_page_token,
    )


# -- workflows ----------------------------------------------------------------


def workflow_of(message: pb.Workflow) -> Workflow:
    return Workflow(
        workflow_id=message.workflow_id,
        current_stage=message.current_stage,
        results_json=message.results_json,
        agent_sessions=dict(message.agent_sessions),
    )


def workflow_message(workflow: Workflow) -> pb.Workflow:
    message = pb.Workflow(
        workflow_id=workflow.workflow_id,
        current_stage=workflow.current_stage,
        results_json=workflow.results_json,
        agent_sessions=workflow.agent_sessions,
        etag=workflow.etag,
        create_time=timestamp(workflow.create_ms),
        update_time=timestamp(workflow.update_ms),
    )
    if workflow.expire_ms is not None:
        message.expire_time.CopyFrom(timestamp(workflow.expire_ms))
    return message


_PAUSED_STATUS = {
    PausedStatus.PAUSED: pb.PAUSED_RUN_STATUS_PAUSED,
    PausedStatus.CLAIMED: pb.PAUSED_RUN_STATUS_CLAIMED,
    PausedStatus.RESOLVED: pb.PAUSED_RUN_STATUS_RESOLVED,
}


def paused_run_message(info: PausedRunInfo) -> pb.PausedRun:
    return pb.PausedRun(
        run_id=info.run_id,
        status=_PAUSED_STATUS[info.status],
        approvals=[
            pb.PendingApproval(
                approval_id=a.approval_id,
                tool_name=a.tool_name,
                arguments_json=a.arguments_json,
                agent=a.agent,
                call_id=a.call_id,
            )
            for a in info.approvals
        ],
        create_time=timestamp(info.create_ms),
        expire_time=timestamp(info.expire_ms),
        claim_id=info.claim_id,
    )

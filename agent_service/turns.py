"""One stateless turn: context from the state service, the agent run, one
etag-checked append of everything the turn produced.

    GetContext(session, budget)  ->  Runner.run(agent, context + message)
        ->  AppendItems(session, [message, tool calls, outputs, reply],
                        etag = the context's, request_id = derived from the caller's)

The etag makes two concurrent turns on one session unable to interleave: the
second append is refused (ABORTED, or one retry on the fresh context when
configured). The request_id makes a retried Chat store nothing twice: the turn
is found in the log by the request_id every stored item carries in its
metadata, and returned as it was stored. A turn that fails before its append
stores nothing.

A replica whose own append left a session's whole log within the budget skips
the GetContext of its next Chat turn on that session (context_cache.py): the
append's etag is then the one it remembered, and when someone else wrote in
between the append is refused and the turn is redone on a fresh context.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
import openai
from agents import (
    AgentsException,
    HandoffOutputItem,
    MaxTurnsExceeded,
    RunConfig,
    Runner,
    RunResult,
    RunResultStreaming,
    ToolCallItem,
    ToolCallOutputItem,
)
from agents.items import RunItem, TResponseInputItem
from agents.stream_events import (
    RawResponsesStreamEvent,
    RunItemStreamEvent,
    StreamEvent,
)

from agent_service import metrics
from agent_service.catalog import AgentCatalog, CatalogEntry
from agent_service.context_cache import ContextCache
from agent_service.settings import AgentServiceSettings
from agent_service.tools import TurnContext
from shared_runtime.auth import current_tenant
from shared_runtime.errors import (
    Aborted,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)
from state_service.client import (
    Context,
    EtagMismatchError,
    InvalidRequestError,
    NewItem,
    SessionNotFoundError,
    StateClient,
    StateServiceError,
    StateUnavailableError,
    StoredItem,
)
from statecar.agent.v1 import agent_service_pb2 as pb

# Metadata every stored item of a turn carries.
REQUEST_ID_KEY = "statecar.request_id"
AGENT_KEY = "statecar.agent"
STATE_REQUEST_ID_LIMIT = 128
# How far back in the log a retried turn is looked for.
REPLAY_SCAN_ITEMS = 2000
# Kept back from the caller's deadline so the turn itself reports it.
DEADLINE_MARGIN_SECONDS = 0.1
# State-service reasons passed on unchanged, by status code: they mean the same
# to a client of this service (see ErrorReason in the agent proto). Any other
# reason with that code gets this service's own (NOT_FOUND, STATE_FULL).
FORWARDED_NOT_FOUND = ("SESSION_NOT_FOUND", "WORKFLOW_NOT_FOUND")
FORWARDED_EXHAUSTED = ("BACKEND_FULL", "TENANT_BUSY")


class Deadline:
    """The caller's deadline, shared by every step of the turn."""

    def __init__(self, seconds: float | None) -> None:
        self._at = None if seconds is None else time.monotonic() + seconds

    def remaining(self) -> float | None:
        if self._at is None:
            return None
        return self._at - time.monotonic() - DEADLINE_MARGIN_SECONDS

    def bound(self, limit: float) -> float:
        """`limit`, shortened to what is left of the deadline."""
        remaining = self.remaining()
        if remaining is None:
            return limit
        if remaining <= 0:
            raise deadline_error()
        return min(limit, remaining)


@dataclass(frozen=True)
class TurnRequest:
    session_id: str
    message: str
    # Empty: the configured default agent.
    agent: str
    # The caller's; empty means the turn cannot be recognised when retried.
    request_id: str
    deadline: Deadline


def state_request_id(caller_request_id: str) -> str:
    """The request_id of the turn's append, in its own namespace so a caller's
    direct writes to the state service can never collide with it."""
    if not caller_request_id:
        return f"turn:{uuid.uuid4().hex}"
    derived = f"turn:{caller_request_id}"
    if len(derived) <= STATE_REQUEST_ID_LIMIT:
        return derived
    return f"turn:sha256:{hashlib.sha256(caller_request_id.encode()).hexdigest()}"


def deadline_error() -> ServiceError:
    return DeadlineExceeded(
        "the turn did not finish within the call's deadline; nothing was stored",
        reason="TURN_DEADLINE",
    )


def state_error(error: StateServiceError) -> ServiceError:
    """A state-service failure as this service reports it."""
    if isinstance(error, StateUnavailableError):
        return Unavailable(
            f"the state service is unavailable: {error.message}", reason="STATE_UNAVAILABLE"
        )
    if isinstance(error, EtagMismatchError):
        return Aborted(str(error.message), reason="ETAG_MISMATCH", metadata=error.metadata)
    if isinstance(error, SessionNotFoundError):
        return NotFound(
            error.message,
            reason=error.reason if error.reason in FORWARDED_NOT_FOUND else "NOT_FOUND",
        )
    if isinstance(error, InvalidRequestError):
        return InvalidArgument(error.metadata.get("field", "request"), error.message)
    if error.code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        retry_after = error.metadata.get("retry_after_seconds")
        return ResourceExhausted(
            error.message,
            reason=error.reason if error.reason in FORWARDED_EXHAUSTED else "STATE_FULL",
            metadata={"retry_after_seconds": retry_after} if retry_after else None,
            retry_delay_seconds=float(retry_after) if retry_after else None,
        )
    return Unavailable(
        f"the state service failed: {error.code.name}: {error.message}", reason="STATE_FAILED"
    )


def model_error(agent: str, error: BaseException) -> ServiceError:
    if isinstance(error, MaxTurnsExceeded):
        return ResourceExhausted(
            f"agent {agent!r} made too many model calls in one turn "
            "(AGENT_SERVICE_MAX_MODEL_CALLS); nothing was stored",
            reason="MODEL_CALL_LIMIT",
        )
    detail = error.message if isinstance(error, openai.APIError) else str(error)
    return Unavailable(
        f"the model of agent {agent!r} failed ({type(error).__name__}: {detail[:300]}); "
        "nothing was stored",
        reason="MODEL_FAILED",
    )


def _item_text(data: dict[str, Any]) -> str:
    content = data.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def reply_of(items: Sequence[tuple[dict[str, Any], str]]) -> tuple[str, str]:
    """The last assistant message's text and agent."""
    for data, agent in reversed(items):
        if data.get("type", "message") == "message" and data.get("role") == "assistant":
            return _item_text(data), agent
    return "", items[-1][1] if items else ""


# The state client's strategy names; a name this version does not know is
# UNSPECIFIED, as the proto says.
_STRATEGIES: dict[str | None, pb.ContextStrategy.ValueType] = {
    "sliding_window": pb.CONTEXT_STRATEGY_SLIDING_WINDOW,
    "token_window": pb.CONTEXT_STRATEGY_TOKEN_WINDOW,
    "summary": pb.CONTEXT_STRATEGY_SUMMARY,
    "retrieval": pb.CONTEXT_STRATEGY_RETRIEVAL,
    "tiered": pb.CONTEXT_STRATEGY_TIERED,
}


def _context_stats(context: Context) -> pb.ContextStats:
    return pb.ContextStats(
        items=len(context.items) + len(context.retrieved),
        tokens=context.token_count,
        token_budget=context.token_budget,
        omitted_items=context.omitted_item_count,
        summary_used=context.summary is not None,
        retrieval_used=bool(context.retrieved),
        strategy=_STRATEGIES.get(context.strategy, pb.CONTEXT_STRATEGY_UNSPECIFIED),
        retrieved_items=len(context.retrieved),
    )


@dataclass
class _Produced:
    """What one agent run produced, before it is stored."""

    items: list[tuple[dict[str, Any], str]]  # (input item, agent name), user message first
    reply: str
    agent: str
    usage: pb.TokenUsage
    run_items: list[RunItem] = field(default_factory=list)
    # Set when the run stopped at tools needing approval (see approvals.py).
    paused: RunResult | RunResultStreaming | None = None


class TurnPauser(Protocol):
    """Stores a run paused on tool approvals and answers the turn with them."""

    async def pause(
        self,
        entry: CatalogEntry,
        request: TurnRequest,
        turn_id: str,
        context: Context,
        result: RunResult | RunResultStreaming,
        stats: pb.ContextStats,
    ) -> pb.ChatResponse: ...


class TurnRunner:
    def __init__(
        self, catalog: AgentCatalog, state: StateClient, settings: AgentServiceSettings
    ) -> None:
        self._catalog = catalog
        self._state = state
        self._settings = settings
        self._run_config = RunConfig(
            tracing_disabled=not settings.tracing, workflow_name="statecar turn"
        )
        # Set by the server when approvals are wired (approvals.Approvals).
        self.pauser: TurnPauser | None = None
        self._context_cache = (
            ContextCache(settings.context_cache_max_bytes, settings.context_cache_max_items)
            if settings.context_cache and settings.context_cache_max_bytes > 0
            else None
        )
        # Turns running on this replica, by (tenant, session_id).
        self._turns_in_flight: dict[tuple[str, str], int] = {}

    def entry(self, agent: str) -> CatalogEntry:
        entry = self._catalog.get(agent or self._catalog.default)
        if entry is None:
            raise NotFound(
                f"no agent named {agent!r}; ListAgents shows the configured agents",
                reason="AGENT_NOT_FOUND",
            )
        return entry

    async def chat(self, request: TurnRequest) -> pb.ChatResponse:
        return await final_response(self.stream(request, streamed=False))

    async def stream(
        self, request: TurnRequest, *, streamed: bool = True, cacheable: bool = True
    ) -> AsyncIterator[pb.StreamChatResponse]:
        """The turn's events; the last one carries the ChatResponse. `cacheable`
        False: the context is read from the state service even when this
        replica has it (see context_cache.py)."""
        entry = self.entry(request.agent)
        started = time.perf_counter()
        outcome = "error"
        try:
            async for event in self._turn(entry, request, streamed=streamed, cacheable=cacheable):
                if event.HasField("final"):
                    outcome = "replayed" if event.final.replayed else "ok"
                    if event.final.pending_approvals:
                        outcome = "paused"
                yield event
        except ServiceError as error:
            outcome = _outcome_of(error)
            raise
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            metrics.TURNS.labels(entry.spec.name, outcome).inc()
            metrics.TURN_SECONDS.labels(entry.spec.name).observe(time.perf_counter() - started)

    async def _turn(
        self, entry: CatalogEntry, request: TurnRequest, *, streamed: bool, cacheable: bool
    ) -> AsyncIterator[pb.StreamChatResponse]:
        turn_id = state_request_id(request.request_id)
        tenant = current_tenant()
        # Streamed turns are never run on a context that may be stale (their
        # reply is seen as it comes, so it cannot be redone). Nor is an agent
        # that can run tools (its own or a handoff's): a stale context means
        # running the turn twice, and a retried request_id is only recognised
        # after the run (see context_cache.py).
        cache = (
            self._context_cache
            if cacheable and not streamed and not entry.spec.tools and not entry.spec.handoffs
            else None
        )
        key = (tenant, request.session_id)
        # Another turn on the session running here: this one reads the
        # context, so that the two conflict as they would without the cache
        # (CONCURRENT_TURN, or one retry) instead of the later one being redone.
        concurrent = self._turns_in_flight.get(key, 0) > 0
        self._turns_in_flight[key] = self._turns_in_flight.get(key, 0) + 1
        try:
            async for event in self._turn_once(
                entry, request, turn_id, tenant, cache, fresh=concurrent, streamed=streamed
            ):
                yield event
        finally:
            left = self._turns_in_flight.pop(key) - 1
            if left:
                self._turns_in_flight[key] = left

    async def _turn_once(
        self,
        entry: CatalogEntry,
        request: TurnRequest,
        turn_id: str,
        tenant: str,
        cache: ContextCache | None,
        *,
        fresh: bool,
        streamed: bool,
    ) -> AsyncIterator[pb.StreamChatResponse]:
        budget = entry.spec.token_budget
        # A streamed reply has been seen by the caller: it cannot be redone.
        attempts = 2 if self._settings.on_conflict == "retry" and not streamed else 1
        cached = (
            cache.get(tenant, request.session_id, budget)
            if cache is not None and not fresh
            else None
        )
        if cached is not None and request.request_id and cached.holds(REQUEST_ID_KEY, turn_id):
            # A retry of a turn this replica stored: answered from a fresh read,
            # exactly as without the cache.
            cached = None
        if cache is not None and cached is None:
            cache.drop(tenant, request.session_id)
            metrics.CONTEXT_CACHE.labels("miss").inc()

        async def read_context() -> Context:
            context: Context = await self._call_state(
                self._state.get_context,
                request.session_id,
                query=request.message,
                token_budget=budget,
                deadline=request.deadline,
            )
            return context

        attempt = 0
        while True:
            if cached is not None:
                context = cached.context
            else:
                context = await read_context()
                if request.request_id and any(
                    item.metadata.get(REQUEST_ID_KEY) == turn_id for item in context.items
                ):
                    yield _final(await self._stored_turn(request, turn_id, context))
                    return
            metrics.CONTEXT_TOKENS.observe(context.token_count)
            produced = _Produced([], "", entry.spec.name, pb.TokenUsage())
            async for event in self._run_agent(entry, request, context, produced, streamed):
                yield event
            if produced.paused is not None and self.pauser is not None:
                if cache is not None:
                    # Its resume appends elsewhere: the entry would only go stale.
                    cache.drop(tenant, request.session_id)
                stats = _context_stats(context)
                yield _final(
                    await self.pauser.pause(
                        entry, request, turn_id, context, produced.paused, stats
                    )
                )
                return
            stored = [
                (data, {REQUEST_ID_KEY: turn_id, AGENT_KEY: agent})
                for data, agent in produced.items
            ]
            try:
                appended = await self._call_state(
                    self._state.append_items,
                    request.session_id,
                    [NewItem(data, metadata) for data, metadata in stored],
                    request_id=turn_id,
                    etag=context.etag,
                    deadline=request.deadline,
                )
            except Aborted:
                if cached is not None and cache is not None:
                    # Someone else wrote since our last append: redo the turn on
                    # the fresh context (this does not use up a conflict retry).
                    metrics.CONTEXT_CACHE.labels("stale").inc()
                    cache.stale(tenant, request.session_id)
                    cached = None
                    continue
                if attempt + 1 < attempts:
                    attempt += 1
                    continue
                raise Aborted(
                    f"another turn on session {request.session_id!r} was stored while this "
                    "one ran; nothing was stored, retry on the fresh context",
                    reason="CONCURRENT_TURN",
                ) from None
            except BaseException:
                if cache is not None:
                    cache.drop(tenant, request.session_id)
                raise
            if appended.replayed:
                if cache is not None:
                    cache.drop(tenant, request.session_id)
                if cached is not None and cache is not None:
                    # Stored by another replica (the cached context was stale):
                    # answered with the context a fresh read gives, as without
                    # the cache.
                    metrics.CONTEXT_CACHE.labels("stale").inc()
                    cache.stale(tenant, request.session_id)
                    context = await read_context()
                yield _final(await self._stored_turn(request, turn_id, context))
                return
            if cached is not None:
                metrics.CONTEXT_CACHE.labels("hit").inc()
            if cache is not None:
                cache.after_append(
                    tenant,
                    request.session_id,
                    budget,
                    context,
                    cached.size_bytes if cached is not None else None,
                    stored,
                    appended,
                )
            _count(produced)
            yield _final(
                pb.ChatResponse(
                    reply=produced.reply,
                    agent=produced.agent,
                    items=[
                        pb.TurnItem(
                            type=data.get("type", "message"),
                            json=_json(data),
                            seq=appended.first_seq + index,
                            agent=agent,
                        )
                        for index, (data, agent) in enumerate(produced.items)
                    ],
                    usage=produced.usage,
                    context=_context_stats(context),
                    etag=appended.etag,
                    session_id=request.session_id,
                )
            )
            return

    async def _run_agent(
        self,
        entry: CatalogEntry,
        request: TurnRequest,
        context: Context,
        produced: _Produced,
        streamed: bool,
    ) -> AsyncIterator[pb.StreamChatResponse]:
        user_item: TResponseInputItem = {"role": "user", "content": request.message}
        # The compressed context: summary (as a system message), retrieved older
        # items, then the newest items.
        model_input: list[TResponseInputItem] = context.input_items()  # type: ignore[assignment]
        model_input.append(user_item)
        turn_context = TurnContext(
            request.session_id,
            self._state,
            lambda: request.deadline.bound(self._settings.state_timeout_seconds),
        )
        arguments: dict[str, Any] = {
            "context": turn_context,
            "max_turns": self._settings.max_model_calls,
            "run_config": self._run_config,
        }
        result: RunResult | RunResultStreaming
        try:
            async with asyncio.timeout(request.deadline.remaining()):
                if streamed:
                    result = Runner.run_streamed(entry.agent, model_input, **arguments)
                    try:
                        async for event in result.stream_events():
                            chat_event = _chat_event(event)
                            if chat_event is not None:
                                yield chat_event
                    finally:
                        if not result.is_complete:
                            result.cancel()
                else:
                    result = await Runner.run(entry.agent, model_input, **arguments)
        except TimeoutError:
            raise deadline_error() from None
        except ServiceError:
            raise
        except (AgentsException, openai.APIError) as error:
            raise model_error(entry.spec.name, error) from error
        if result.interruptions:
            produced.paused = result
            return
        items: list[tuple[dict[str, Any], str]] = [(dict(user_item), entry.spec.name)]
        items.extend(
            (dict(run_item.to_input_item()), run_item.agent.name) for run_item in result.new_items
        )
        produced.items = items
        produced.reply = str(result.final_output or "")
        produced.agent = result.last_agent.name
        usage = result.context_wrapper.usage
        produced.usage = pb.TokenUsage(
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            total_tokens=usage.total_tokens,
            model_requests=usage.requests,
        )
        produced.run_items = list(result.new_items)

    async def _stored_turn(
        self, request: TurnRequest, turn_id: str, context: Context
    ) -> pb.ChatResponse:
        """The turn stored under turn_id, rebuilt from the log."""
        found: list[StoredItem] = []
        token = ""
        scanned = 0
        complete = False
        while not complete and scanned < REPLAY_SCAN_ITEMS:
            page = await self._call_state(
                self._state.list_items,
                request.session_id,
                page_size=200,
                page_token=token,
                newest_first=True,
                deadline=request.deadline,
            )
            for item in page.items:
                if item.metadata.get(REQUEST_ID_KEY) == turn_id:
                    found.append(item)
                elif found:  # a turn's items are contiguous
                    complete = True
                    break
            scanned += len(page.items)
            token = page.next_page_token
            complete = complete or not token
        found.reverse()
        pairs = [(item.data, item.metadata.get(AGENT_KEY, "")) for item in found]
        reply, agent = reply_of(pairs)
        return pb.ChatResponse(
            reply=reply,
            agent=agent,
            items=[
                pb.TurnItem(
                    type=item.data.get("type", "message"),
                    json=_json(item.data),
                    seq=item.seq,
                    agent=item.metadata.get(AGENT_KEY, ""),
                )
                for item in found
            ],
            usage=pb.TokenUsage(),
            context=_context_stats(context),
            etag=context.etag,
            session_id=request.session_id,
            replayed=True,
        )

    async def _call_state(
        self, method: Callable[..., Any], *args: Any, deadline: Deadline, **kwargs: Any
    ) -> Any:
        try:
            return await method(
                *args, timeout=deadline.bound(self._settings.state_timeout_seconds), **kwargs
            )
        except StateServiceError as error:
            if error.code is grpc.StatusCode.DEADLINE_EXCEEDED and (deadline.remaining() or 1) <= 0:
                raise deadline_error() from error
            raise state_error(error) from error


async def final_response(events: AsyncIterator[pb.StreamChatResponse]) -> pb.ChatResponse:
    """The ChatResponse a turn's events end with."""
    final: pb.ChatResponse | None = None
    async for event in events:
        if event.HasField("final"):
            final = event.final
    assert final is not None
    return final


def _json(data: dict[str, Any]) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def _final(response: pb.ChatResponse) -> pb.StreamChatResponse:
    return pb.StreamChatResponse(final=response)


def _count(produced: _Produced) -> None:
    metrics.TOKENS.labels("input").inc(produced.usage.input_tokens)
    metrics.TOKENS.labels("output").inc(produced.usage.output_tokens)
    for run_item in produced.run_items:
        if isinstance(run_item, ToolCallItem):
            metrics.TOOL_CALLS.labels(getattr(run_item.raw_item, "name", "unknown")).inc()
        elif isinstance(run_item, HandoffOutputItem):
            metrics.HANDOFFS.labels(run_item.source_agent.name, run_item.target_agent.name).inc()


def _outcome_of(error: ServiceError) -> str:
    return {
        "CONCURRENT_TURN": "conflict",
        "MODEL_FAILED": "model_error",
        "MODEL_CALL_LIMIT": "model_error",
        "TURN_DEADLINE": "deadline",
        "STATE_UNAVAILABLE": "state_unavailable",
        "INVALID_FIELD": "invalid",
        "AGENT_NOT_FOUND": "invalid",
    }.get(error.reason, "error")


def _chat_event(event: StreamEvent) -> pb.StreamChatResponse | None:
    if isinstance(event, RawResponsesStreamEvent):
        if event.data.type == "response.output_text.delta":
            return pb.StreamChatResponse(text_delta=event.data.delta)
        return None
    if isinstance(event, RunItemStreamEvent):
        item = event.item
        if isinstance(item, ToolCallItem):
            raw = item.raw_item
            return pb.StreamChatResponse(
                tool_call_started=pb.ToolCallStarted(
                    call_id=str(getattr(raw, "call_id", "") or ""),
                    name=str(getattr(raw, "name", "") or ""),
                    arguments=str(getattr(raw, "arguments", "") or ""),
                )
            )
        if isinstance(item, ToolCallOutputItem):
            raw_output = item.raw_item
            call_id = (
                raw_output.get("call_id", "")
                if isinstance(raw_output, dict)
                else getattr(raw_output, "call_id", "")
            )
            return pb.StreamChatResponse(
                tool_call_finished=pb.ToolCallFinished(
                    call_id=str(call_id), output=str(item.output)
                )
            )
        if isinstance(item, HandoffOutputItem):
            return pb.StreamChatResponse(
                handoff=pb.Handoff(
                    from_agent=item.source_agent.name, to_agent=item.target_agent.name
                )
            )
        return None
    return None

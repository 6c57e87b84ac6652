"""Typed results of the state client."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import FrozenInstanceError, dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from google.protobuf import timestamp_pb2

from statecar.state.v1 import state_service_pb2 as pb


@dataclass(frozen=True, slots=True)
class NewItem:
    """An item to append: an openai-agents input item plus optional metadata,
    when it was originally said (a timezone-aware datetime; naive means UTC)
    and who said it (see the Item message for their limits)."""

    data: Mapping[str, Any]
    metadata: Mapping[str, str] = field(default_factory=dict)
    original_time: datetime | None = None
    speaker: str = ""

    def to_proto(self) -> pb.Item:
        raw = json.dumps(self.data, ensure_ascii=False, separators=(",", ":"))
        message = pb.Item(json=raw, metadata=dict(self.metadata), speaker=self.speaker)
        if self.original_time is not None:
            message.original_time.FromDatetime(self.original_time)
        return message


# A Timestamp not yet turned into a datetime: (seconds, nanos).
_Pending = tuple[int, int]


def _timestamp(value: _Pending) -> datetime:
    seconds, nanos = value
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos).ToDatetime()


class StoredItem:
    """An item as stored: its seq, its openai-agents item (`data`), metadata,
    create time (naive UTC), when it was originally said and who said it.

    Immutable, compared by value (not by `raw_json`). Items read from the
    service turn their times into datetimes only when read: most readers
    (every turn of a Session) never look at them, and the conversion was
    a third of a 20-item context's client cost.
    """

    __slots__ = ("_create", "_original", "data", "metadata", "raw_json", "seq", "speaker")
    __match_args__ = ("seq", "data", "metadata", "create_time", "original_time", "speaker")

    seq: int
    data: dict[str, Any]
    metadata: dict[str, str]
    speaker: str
    # The item's JSON as the service sent it ("" when built by hand).
    raw_json: str
    _create: datetime | _Pending | None
    _original: datetime | _Pending | None

    def __init__(
        self,
        seq: int,
        data: dict[str, Any],
        metadata: dict[str, str],
        create_time: datetime | None,
        original_time: datetime | None = None,
        speaker: str = "",
        raw_json: str = "",
    ) -> None:
        _set(self, "seq", seq)
        _set(self, "data", data)
        _set(self, "metadata", metadata)
        _set(self, "_create", create_time)
        _set(self, "_original", original_time)
        _set(self, "speaker", speaker)
        _set(self, "raw_json", raw_json)

    @property
    def create_time(self) -> datetime | None:
        return self._decoded("_create")

    @property
    def original_time(self) -> datetime | None:
        return self._decoded("_original")

    def _decoded(self, slot: str) -> datetime | None:
        """The time in `slot`, decoded from its (seconds, nanos) on first read."""
        value: datetime | _Pending | None = getattr(self, slot)
        if isinstance(value, tuple):
            value = _timestamp(value)
            _set(self, slot, value)
        return value

    def __setattr__(self, name: str, value: object) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")

    def _key(self) -> tuple[Any, ...]:
        return (
            self.seq,
            self.data,
            self.metadata,
            self.create_time,
            self.original_time,
            self.speaker,
        )

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._key() == other._key()

    __hash__ = None  # type: ignore[assignment]  # data is a dict, as before: unhashable

    def __repr__(self) -> str:
        return (
            f"StoredItem(seq={self.seq!r}, data={self.data!r}, metadata={self.metadata!r}, "
            f"create_time={self.create_time!r}, original_time={self.original_time!r}, "
            f"speaker={self.speaker!r})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (StoredItem, (*self._key(), self.raw_json))

    @classmethod
    def from_proto(cls, item: pb.Item) -> StoredItem:
        raw = item.json
        return cls._of(item, json.loads(raw), raw)

    @classmethod
    def _of(cls, item: pb.Item, data: dict[str, Any], raw: str) -> StoredItem:
        new = object.__new__(cls)
        _set(new, "seq", item.seq)
        _set(new, "data", data)
        _set(new, "metadata", dict(item.metadata) if item.metadata else {})
        if item.HasField("create_time"):
            created = item.create_time
            _set(new, "_create", (created.seconds, created.nanos))
        else:
            _set(new, "_create", None)
        if item.HasField("original_time"):
            said = item.original_time
            _set(new, "_original", (said.seconds, said.nanos))
        else:
            _set(new, "_original", None)
        _set(new, "speaker", item.speaker)
        _set(new, "raw_json", raw)
        return new

    @classmethod
    def all_from_proto(cls, items: Sequence[pb.Item]) -> list[StoredItem]:
        """The items of a response, their JSON decoded in one json.loads (a
        third of the conversion's cost for a 20-item context: per-call
        overhead, not parsing)."""
        if not items:
            return []
        raws = [item.json for item in items]
        try:
            decoded = json.loads("[" + ",".join(raws) + "]")
        except ValueError:
            decoded = None
        if not isinstance(decoded, list) or len(decoded) != len(raws):
            # Only items the service did not validate could get here.
            return [cls.from_proto(item) for item in items]
        return [
            cls._of(item, data, raw) for item, data, raw in zip(items, decoded, raws, strict=True)
        ]


_set = object.__setattr__


@dataclass(frozen=True, slots=True)
class AppendResult:
    etag: str
    first_seq: int
    last_seq: int
    # True when the request_id had been applied before and nothing was appended.
    replayed: bool = False
    # Tokens of the whole log after the append, as GetContext counts them (0: not known).
    log_token_count: int = 0


STRATEGIES = ("sliding_window", "token_window", "summary", "retrieval", "tiered")


def strategy_to_proto(name: str | None) -> pb.ContextStrategy.ValueType:
    """ "tiered" -> CONTEXT_STRATEGY_TIERED; None -> UNSPECIFIED."""
    if name is None:
        return pb.CONTEXT_STRATEGY_UNSPECIFIED
    if name not in STRATEGIES:
        raise ValueError(f"unknown context strategy {name!r}; known: {', '.join(STRATEGIES)}")
    return pb.ContextStrategy.Value(f"CONTEXT_STRATEGY_{name.upper()}")


def strategy_from_proto(value: int) -> str | None:
    if value == pb.CONTEXT_STRATEGY_UNSPECIFIED:
        return None
    try:
        name = pb.ContextStrategy.Name(pb.ContextStrategy.ValueType(value))
    except ValueError:
        return None
    return name.removeprefix("CONTEXT_STRATEGY_").lower()


@dataclass(frozen=True, slots=True)
class TierShares:
    """Budget shares of the compressed strategies (see the API's TierShares)."""

    recent: float
    summary: float
    retrieval: float

    def to_proto(self) -> pb.TierShares:
        return pb.TierShares(recent=self.recent, summary=self.summary, retrieval=self.retrieval)

    @classmethod
    def from_proto(cls, shares: pb.TierShares) -> TierShares:
        return cls(shares.recent, shares.summary, shares.retrieval)


@dataclass(frozen=True, slots=True)
class ContextSummary:
    """A summary of log items first_seq..last_seq."""

    text: str
    first_seq: int
    last_seq: int
    token_count: int


@dataclass(frozen=True, slots=True)
class RetrievedItem:
    item: StoredItem
    score: float


@dataclass(frozen=True, slots=True)
class Context:
    """What to send the model: summary, then retrieved items, then items."""

    items: list[StoredItem]
    etag: str
    token_count: int
    token_budget: int
    total_item_count: int
    omitted_item_count: int
    strategy: str | None = None
    summary: ContextSummary | None = None
    retrieved: list[RetrievedItem] = field(default_factory=list)
    query: str = ""
    summary_lag: int = 0

    @classmethod
    def from_proto(cls, response: pb.GetContextResponse) -> Context:
        summary = None
        if response.HasField("summary"):
            s = response.summary
            summary = ContextSummary(s.text, s.first_seq, s.last_seq, s.token_count)
        return cls(
            items=StoredItem.all_from_proto(response.items),
            etag=response.etag,
            token_count=response.token_count,
            token_budget=response.token_budget,
            total_item_count=response.total_item_count,
            omitted_item_count=response.omitted_item_count,
            strategy=strategy_from_proto(response.strategy),
            summary=summary,
            retrieved=[
                RetrievedItem(StoredItem.from_proto(r.item), r.score)
                for r in response.retrieved_items
            ],
            query=response.query,
            summary_lag=response.summary_lag,
        )

    def input_items(
        self, marker_role: Literal["user", "developer", "system"] = "user"
    ) -> list[dict[str, Any]]:
        """The context as openai-agents input items: the summary and the
        retrieved items as quoted marker messages (a raw retrieved tool call
        without its output, or an output without its call, is refused by the
        model APIs), then the recent items verbatim. See client/rendering.py."""
        # Imported here: rendering.py imports this module.
        from state_service.client.rendering import markers

        return [*markers(self.summary, self.retrieved, marker_role), *(i.data for i in self.items)]


@dataclass(frozen=True, slots=True)
class ItemsPage:
    items: list[StoredItem]
    next_page_token: str
    etag: str
    total_item_count: int


@dataclass(frozen=True, slots=True)
class PopResult:
    item: StoredItem | None
    etag: str


def _duration(message: Any, present: bool) -> timedelta | None:
    return message.ToTimedelta() if present else None


@dataclass(frozen=True, slots=True)
class SessionInfo:
    session_id: str
    item_count: int
    last_seq: int
    etag: str
    create_time: datetime
    update_time: datetime
    expire_time: datetime | None
    ttl: timedelta | None
    persist: bool
    effective_ttl: timedelta | None
    context_strategy: str | None = None
    tier_shares: TierShares | None = None

    @classmethod
    def from_proto(cls, session: pb.Session) -> SessionInfo:
        return cls(
            session_id=session.session_id,
            item_count=session.item_count,
            last_seq=session.last_seq,
            etag=session.etag,
            create_time=session.create_time.ToDatetime(),
            update_time=session.update_time.ToDatetime(),
            expire_time=session.expire_time.ToDatetime()
            if session.HasField("expire_time")
            else None,
            ttl=_duration(session.settings.ttl, session.settings.HasField("ttl")),
            persist=session.settings.persist,
            effective_ttl=_duration(session.effective_ttl, session.HasField("effective_ttl")),
            context_strategy=strategy_from_proto(session.settings.context_strategy),
            tier_shares=TierShares.from_proto(session.settings.tier_shares)
            if session.settings.HasField("tier_shares")
            else None,
        )


@dataclass(frozen=True, slots=True)
class CompactResult:
    """A stored compacted view: the session's new etag, the view's stored
    items and the last log seq they stand in for."""

    etag: str
    view_item_count: int
    compacted_up_to_seq: int
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class CompactedView:
    """A session's compacted view: stored items (seq 0), then log items
    appended after it; `compacted` False means no view (the log is the history)."""

    compacted: bool
    items: list[StoredItem]
    total_item_count: int
    compacted_up_to_seq: int
    etag: str


@dataclass(frozen=True, slots=True)
class ForkResult:
    """What ForkSession created: the new session, how many items it copied and
    up to which seq (the request's, or the source's last when it sent 0)."""

    session: SessionInfo
    copied_item_count: int
    up_to_seq: int
    # True when the request_id had been applied before and nothing was copied.
    replayed: bool = False

    @classmethod
    def from_proto(cls, response: pb.ForkSessionResponse) -> ForkResult:
        return cls(
            SessionInfo.from_proto(response.session),
            response.copied_item_count,
            response.up_to_seq,
            replayed=response.replayed,
        )


@dataclass(frozen=True, slots=True)
class SessionsPage:
    sessions: list[SessionInfo]
    next_page_token: str


@dataclass(frozen=True, slots=True)
class WorkflowInfo:
    workflow_id: str
    current_stage: str
    results: dict[str, Any]
    agent_sessions: dict[str, str]
    etag: str
    create_time: datetime
    update_time: datetime
    expire_time: datetime | None

    @classmethod
    def from_proto(cls, workflow: pb.Workflow) -> WorkflowInfo:
        return cls(
            workflow_id=workflow.workflow_id,
            current_stage=workflow.current_stage,
            results=json.loads(workflow.results_json) if workflow.results_json else {},
            agent_sessions=dict(workflow.agent_sessions),
            etag=workflow.etag,
            create_time=workflow.create_time.ToDatetime(),
            update_time=workflow.update_time.ToDatetime(),
            expire_time=workflow.expire_time.ToDatetime()
            if workflow.HasField("expire_time")
            else None,
        )


@dataclass(frozen=True)
class PendingApproval:
    """A tool call of a paused run waiting for a human decision."""

    approval_id: str
    tool_name: str
    arguments_json: str
    agent: str
    call_id: str


@dataclass(frozen=True)
class PausedRun:
    """A paused agent run (without its state): status is "paused", "claimed"
    or "resolved"."""

    run_id: str
    status: str
    approvals: list[PendingApproval]
    create_time: datetime
    expire_time: datetime
    # Who claimed it; empty while paused.
    claim_id: str = ""

    @classmethod
    def from_proto(cls, run: pb.PausedRun) -> PausedRun:
        return cls(
            run_id=run.run_id,
            status=pb.PausedRunStatus.Name(run.status).removeprefix("PAUSED_RUN_STATUS_").lower(),
            approvals=[
                PendingApproval(a.approval_id, a.tool_name, a.arguments_json, a.agent, a.call_id)
                for a in run.approvals
            ],
            create_time=run.create_time.ToDatetime(),
            expire_time=run.expire_time.ToDatetime(),
            claim_id=run.claim_id,
        )


@dataclass(frozen=True)
class ClaimedRun:
    """A claimed paused run: its state, or (resolved) the result stored by
    the same claim id's earlier resolve."""

    run: PausedRun
    state: bytes
    resolved: bool
    # This claim id held it already (not resolved): check, never run again.
    held: bool = False


@dataclass(frozen=True, slots=True)
class ItemRecord:
    """An item exactly as stored, for moving it between stores: `json` is
    its text character for character (never re-encoded), times are
    milliseconds since the epoch (0: not given)."""

    seq: int
    json: str
    metadata: Mapping[str, str] = field(default_factory=dict)
    create_ms: int = 0
    original_ms: int = 0
    speaker: str = ""

    def to_proto(self) -> pb.Item:
        message = pb.Item(
            seq=self.seq, json=self.json, metadata=dict(self.metadata), speaker=self.speaker
        )
        if self.create_ms:
            message.create_time.FromMilliseconds(self.create_ms)
        if self.original_ms:
            message.original_time.FromMilliseconds(self.original_ms)
        return message

    @classmethod
    def from_proto(cls, item: pb.Item) -> ItemRecord:
        return cls(
            seq=item.seq,
            json=item.json,
            metadata=dict(item.metadata),
            create_ms=item.create_time.ToMilliseconds() if item.HasField("create_time") else 0,
            original_ms=(
                item.original_time.ToMilliseconds() if item.HasField("original_time") else 0
            ),
            speaker=item.speaker,
        )


@dataclass(frozen=True, slots=True)
class EraseResult:
    """What an erase removed: sessions (1 or 0 for one session), Redis keys,
    durable-tier rows."""

    sessions: int
    deleted_keys: int
    durable_rows: int

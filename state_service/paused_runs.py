"""Paused agent runs: turns waiting for a human to approve or reject tool calls.

The agent service pauses a turn when the model calls a tool that needs
approval, and keeps the serialized openai-agents RunState here rather than in
its process, so any replica can resume it. A paused run lives beside its
session, in one hash per session (``<prefix>:{<tenant>:<session>}:p``, the
session's slot) with its own expiry (STATE_SERVICE_PAUSED_RUN_TTL_SECONDS).

Its life is paused -> claimed -> resolved, each step one Lua script
(storage/scripts.lua, ``paused_*``):

- ``put`` stores it if the session is still at the etag the run read (a turn
  stored meanwhile makes the pause stale: ABORTED, as for an append);
- ``claim`` hands it to exactly one claim id. This is what makes a resume
  run its tools once: two replicas racing both send a claim, Redis runs the
  scripts one after the other, and the second sees "claimed". The holder's
  own retry gets the state back marked ``held``: never to run it again, only
  to find out whether the first attempt got as far as storing its turn;
- ``resolve`` replaces the state by the resumer's result, which a retry of
  the same claim id gets back instead of running anything.

A claim is never released or taken over. If the resumer dies after claiming,
whether its tools ran is unknown, so nobody may run them again: the run stays
claimed until it expires (at-most-once, never twice). Bodies and approvals
are sealed like log items when encryption is on: they hold conversation text
and tool arguments.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from state_service import metrics
from state_service.encryption import KeyRing
from state_service.errors import (
    PausedRunClaimed,
    PausedRunLimit,
    PausedRunNotFound,
    PausedRunResolved,
)
from state_service.sessions import now_ms
from state_service.storage.redis import (
    PausedClaimOutcome,
    PausedHeader,
    PausedStatus,
    RedisStorage,
)


@dataclass(frozen=True, slots=True)
class Approval:
    approval_id: str
    tool_name: str
    arguments_json: str
    agent: str
    call_id: str


@dataclass(frozen=True, slots=True)
class PausedRunInfo:
    run_id: str
    status: PausedStatus
    approvals: list[Approval]
    create_ms: int
    expire_ms: int
    claim_id: str = ""


@dataclass(frozen=True, slots=True)
class Claimed:
    run: PausedRunInfo
    # The run state when claimed now; the stored result when `resolved`.
    body: bytes
    resolved: bool
    # This claim id already held it (claimed earlier, not resolved): the
    # caller may only check whether its first attempt finished.
    held: bool = False


@dataclass(frozen=True, slots=True)
class PausedRunLimits:
    ttl_seconds: int
    max_runs: int
    max_bytes: int


def _encode_approvals(approvals: list[Approval]) -> bytes:
    return json.dumps(
        [[a.approval_id, a.tool_name, a.arguments_json, a.agent, a.call_id] for a in approvals],
        separators=(",", ":"),
    ).encode()


def _decode_approvals(raw: bytes) -> list[Approval]:
    return [Approval(*entry) for entry in json.loads(raw)] if raw else []


class PausedRuns:
    def __init__(
        self, storage: RedisStorage, limits: PausedRunLimits, *, keys: KeyRing | None = None
    ) -> None:
        self._storage = storage
        self._limits = limits
        self._keys = keys

    def _seal(self, tenant: str, session_id: str, payload: bytes) -> bytes:
        return payload if self._keys is None else self._keys.seal(tenant, session_id, payload)

    def _open(self, tenant: str, session_id: str, payload: bytes) -> bytes:
        if self._keys is None or not payload:
            return payload
        return self._keys.open(tenant, session_id, payload)

    def _info(
        self, tenant: str, session_id: str, run_id: str, header: PausedHeader, approvals: bytes
    ) -> PausedRunInfo:
        return PausedRunInfo(
            run_id,
            header.status,
            _decode_approvals(self._open(tenant, session_id, approvals)),
            header.create_ms,
            header.expire_ms,
            header.claim_id,
        )

    def _check_size(self, what: str, size: int) -> None:
        if size > self._limits.max_bytes:
            raise PausedRunLimit(
                f"the paused run's {what} is {size} bytes; the limit is "
                f"{self._limits.max_bytes} (STATE_SERVICE_MAX_PAUSED_RUN_BYTES); nothing was "
                "stored",
                self._limits.max_bytes,
            )

    async def put(
        self,
        tenant: str,
        session_id: str,
        run_id: str,
        *,
        etag: str,
        state: bytes,
        approvals: list[Approval],
    ) -> tuple[PausedRunInfo, bool]:
        """The stored run and whether run_id had been stored before."""
        self._check_size("state", len(state))
        encoded = _encode_approvals(approvals)
        self._check_size("approvals", len(encoded))
        put = await self._storage.paused_put(
            tenant,
            session_id,
            run_id,
            expected_etag=etag,
            now_ms=now_ms(),
            ttl_ms=self._limits.ttl_seconds * 1000,
            max_runs=self._limits.max_runs,
            body=self._seal(tenant, session_id, state),
            approvals=self._seal(tenant, session_id, encoded),
        )
        if put.header is None:
            raise PausedRunLimit(
                f"session {session_id!r} already has {put.live_runs} paused runs; the limit "
                f"is {self._limits.max_runs} (STATE_SERVICE_MAX_PAUSED_RUNS): resolve some or "
                "let them expire",
                self._limits.max_runs,
            )
        if put.replayed:
            # The stored approvals, not the retry's: they are what was returned.
            for info in await self.list(tenant, session_id):
                if info.run_id == run_id:
                    return info, True
        else:
            metrics.PAUSED_RUNS.labels("put").inc()
        return PausedRunInfo(
            run_id, put.header.status, approvals, put.header.create_ms, put.header.expire_ms
        ), put.replayed

    async def list(self, tenant: str, session_id: str) -> list[PausedRunInfo]:
        entries = await self._storage.paused_list(tenant, session_id, now_ms=now_ms())
        runs = [
            self._info(tenant, session_id, run_id, header, approvals)
            for run_id, header, approvals in entries
        ]
        runs.sort(key=lambda run: (run.create_ms, run.run_id))
        return runs

    async def claim(self, tenant: str, session_id: str, run_id: str, claim_id: str) -> Claimed:
        claim = await self._storage.paused_claim(
            tenant, session_id, run_id, claim_id=claim_id, now_ms=now_ms()
        )
        outcome = claim.outcome
        if outcome is PausedClaimOutcome.MISSING or claim.header is None:
            raise PausedRunNotFound(run_id)
        if outcome is PausedClaimOutcome.BUSY:
            metrics.PAUSED_RUNS.labels("claim_conflict").inc()
            raise PausedRunClaimed(run_id)
        if outcome is PausedClaimOutcome.DONE:
            metrics.PAUSED_RUNS.labels("claim_conflict").inc()
            raise PausedRunResolved(run_id)
        if outcome is PausedClaimOutcome.CLAIMED:
            metrics.PAUSED_RUNS.labels("claim").inc()
        info = self._info(tenant, session_id, run_id, claim.header, claim.approvals)
        return Claimed(
            info,
            self._open(tenant, session_id, claim.body),
            resolved=outcome is PausedClaimOutcome.RESOLVED,
            held=outcome is PausedClaimOutcome.HELD,
        )

    async def resolve(
        self, tenant: str, session_id: str, run_id: str, claim_id: str, result: bytes
    ) -> PausedRunInfo:
        self._check_size("result", len(result))
        held, header = await self._storage.paused_resolve(
            tenant,
            session_id,
            run_id,
            claim_id=claim_id,
            now_ms=now_ms(),
            result=self._seal(tenant, session_id, result),
        )
        if header is None:
            raise PausedRunNotFound(run_id)
        if not held:
            raise PausedRunClaimed(run_id)
        metrics.PAUSED_RUNS.labels("resolve").inc()
        return PausedRunInfo(
            run_id, header.status, [], header.create_ms, header.expire_ms, header.claim_id
        )

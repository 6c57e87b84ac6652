"""Multi-agent workflow state: one small document per workflow, replaced as a
whole under an etag compare-and-set (no cache: it is mutable and small).

The stored body is protobuf bytes in the layout of the API's ``Workflow`` when
workflows were introduced (fields 2-4), pinned in frozen_schema.py so the API
can change without migrating stored workflows.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

from state_service import metrics
from state_service.errors import EtagMismatch, WorkflowNotFound
from state_service.frozen_schema import message_class
from state_service.storage.redis import RedisStorage, WorkflowRecord

_Body = message_class(
    "statecar.state.stored.v0",
    "WorkflowBody",
    [("current_stage", 2, "string"), ("results_json", 3, "bytes"), ("agent_sessions", 4, "map")],
)


@dataclass(frozen=True, slots=True)
class Workflow:
    """A workflow's document; etag and times are the stored version's (empty
    in an update)."""

    workflow_id: str
    current_stage: str = ""
    results_json: bytes = b""
    agent_sessions: Mapping[str, str] = field(default_factory=dict)
    etag: str = ""
    create_ms: int = 0
    update_ms: int = 0
    expire_ms: int | None = None


class WorkflowStore:
    def __init__(self, storage: RedisStorage) -> None:
        self._storage = storage

    async def get(self, tenant: str, workflow_id: str) -> Workflow:
        record = await self._storage.get_workflow(tenant, workflow_id)
        if record is None:
            raise WorkflowNotFound(workflow_id)
        return _workflow(workflow_id, record)

    async def update(
        self, tenant: str, workflow: Workflow, *, etag: str, allow_missing: bool
    ) -> Workflow:
        body = _Body(
            current_stage=workflow.current_stage,
            results_json=workflow.results_json,
            agent_sessions=workflow.agent_sessions,
        ).SerializeToString()
        now = time.time_ns() // 1_000_000
        try:
            record = await self._storage.put_workflow(
                tenant,
                workflow.workflow_id,
                body,
                expected_etag=etag,
                allow_missing=allow_missing,
                new_incarnation=uuid.uuid4().hex[:16],
                now_ms=now,
            )
        except EtagMismatch:
            metrics.ETAG_CONFLICTS.labels("update_workflow").inc()
            raise
        if record is None:
            raise WorkflowNotFound(workflow.workflow_id)
        return _workflow(workflow.workflow_id, record)

    async def delete(
        self, tenant: str, workflow_id: str, *, etag: str, allow_missing: bool
    ) -> None:
        try:
            existed = await self._storage.delete_workflow(tenant, workflow_id, expected_etag=etag)
        except EtagMismatch:
            metrics.ETAG_CONFLICTS.labels("delete_workflow").inc()
            raise
        if not existed and not allow_missing:
            raise WorkflowNotFound(workflow_id)


def _workflow(workflow_id: str, record: WorkflowRecord) -> Workflow:
    body = _Body.FromString(record.body)
    return Workflow(
        workflow_id=workflow_id,
        current_stage=body.current_stage,
        results_json=body.results_json,
        agent_sessions=dict(body.agent_sessions),
        etag=record.etag,
        create_ms=record.create_ms,
        update_ms=record.update_ms,
        expire_ms=time.time_ns() // 1_000_000 + record.pttl_ms if record.pttl_ms >= 0 else None,
    )

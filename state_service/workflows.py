"""Multi-agent workflow state: one small document per workflow, replaced as a
whole under an etag compare-and-set (no cache: it is mutable and small)."""

from __future__ import annotations

import time
import uuid

from google.protobuf import timestamp_pb2

from shared_runtime.errors import EtagMismatch, NotFound
from state_service import metrics
from state_service.storage.redis import RedisStorage, WorkflowRecord
from statecar.state.v1 import state_service_pb2 as pb


def _timestamp(ms: int) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromMilliseconds(ms)
    return ts


class WorkflowStore:
    def __init__(self, storage: RedisStorage) -> None:
        self._storage = storage

    async def get(self, tenant: str, workflow_id: str) -> pb.Workflow:
        record = await self._storage.get_workflow(tenant, workflow_id)
        if record is None:
            raise _not_found(workflow_id)
        return _message(workflow_id, record)

    async def update(
        self, tenant: str, workflow: pb.Workflow, *, etag: str, allow_missing: bool
    ) -> pb.Workflow:
        body = pb.Workflow(
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
            raise _not_found(workflow.workflow_id)
        return _message(workflow.workflow_id, record)

    async def delete(
        self, tenant: str, workflow_id: str, *, etag: str, allow_missing: bool
    ) -> None:
        try:
            existed = await self._storage.delete_workflow(tenant, workflow_id, expected_etag=etag)
        except EtagMismatch:
            metrics.ETAG_CONFLICTS.labels("delete_workflow").inc()
            raise
        if not existed and not allow_missing:
            raise _not_found(workflow_id)


def _message(workflow_id: str, record: WorkflowRecord) -> pb.Workflow:
    workflow = pb.Workflow.FromString(record.body)
    workflow.workflow_id = workflow_id
    workflow.etag = record.etag
    workflow.create_time.CopyFrom(_timestamp(record.create_ms))
    workflow.update_time.CopyFrom(_timestamp(record.update_ms))
    if record.pttl_ms >= 0:
        workflow.expire_time.CopyFrom(_timestamp(time.time_ns() // 1_000_000 + record.pttl_ms))
    return workflow


def _not_found(workflow_id: str) -> NotFound:
    return NotFound(
        f"workflow {workflow_id!r} does not exist",
        reason="WORKFLOW_NOT_FOUND",
        metadata={"workflow_id": workflow_id},
    )

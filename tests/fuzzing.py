"""The fuzzing harness shared by both services' hypothesis tests: whatever a
request holds, never INTERNAL/UNKNOWN, and a refused request leaves Redis
exactly as it was (DEBUG DIGEST of the whole dataset)."""

from __future__ import annotations

from typing import Any

import grpc
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}


def _digest(client: redis.Redis) -> Any:
    return client.execute_command("DEBUG", "DIGEST")  # type: ignore[no-untyped-call]


def check_request(stub: Any, digest_client: redis.Redis, rpc: str, request: Any) -> None:
    before = _digest(digest_client)
    try:
        response = getattr(stub, rpc)(request, timeout=10)
        if isinstance(response, grpc.Call):  # a server stream: read it to the end
            list(response)  # type: ignore[call-overload]
    except grpc.RpcError as error:
        code = error.code()
        assert code not in FORBIDDEN, (rpc, code, error.details())
        assert _digest(digest_client) == before, (rpc, code, "a refused request changed Redis")


def fuzz(
    stub: Any, digest_client: redis.Redis, rpc: str, requests: st.SearchStrategy[Any], examples: int
) -> None:
    @settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(request=requests)
    def run(request: Any) -> None:
        check_request(stub, digest_client, rpc, request)

    run()

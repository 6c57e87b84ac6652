"""gRPC metrics with the names dashboards know (the go-grpc-prometheus family).

Label values follow go-grpc-prometheus too: grpc_type is unary, server_stream,
...; grpc_code is the Go spelling of the status (OK, NotFound, Unavailable).
"""

from __future__ import annotations

from typing import Any

import grpc
from prometheus_client import Counter, Histogram

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
)  # fmt: skip

SERVER_FAULT_CODES = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)


def go_code(code: grpc.StatusCode) -> str:
    """NOT_FOUND -> NotFound; OK stays OK."""
    if code == grpc.StatusCode.OK:
        return "OK"
    if code == grpc.StatusCode.CANCELLED:
        return "Canceled"
    return "".join(part.capitalize() for part in code.name.split("_"))


_SERVER_LABELS = ["grpc_type", "grpc_service", "grpc_method"]

SERVER_STARTED = Counter("grpc_server_started_total", "RPCs started on the server.", _SERVER_LABELS)
SERVER_HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, regardless of success or failure.",
    [*_SERVER_LABELS, "grpc_code"],
)
SERVER_HANDLING = Histogram(
    "grpc_server_handling_seconds",
    "Time the server took to handle an RPC.",
    _SERVER_LABELS,
    buckets=LATENCY_BUCKETS,
)
SERVER_MSG_RECEIVED = Counter(
    "grpc_server_msg_received_total", "Stream messages received by the server.", _SERVER_LABELS
)
SERVER_MSG_SENT = Counter(
    "grpc_server_msg_sent_total", "Stream messages sent by the server.", _SERVER_LABELS
)


class ServerLabels:
    """One method's metric children, resolved once (labels() lookups are not free)."""

    __slots__ = ("_handled", "_handling", "_msg_received", "_msg_sent", "_started", "_values")

    def __init__(self, grpc_type: str, grpc_service: str, grpc_method: str) -> None:
        values = (grpc_type, grpc_service, grpc_method)
        self._values = values
        self._started = SERVER_STARTED.labels(*values)
        self._msg_received = SERVER_MSG_RECEIVED.labels(*values)
        self._msg_sent = SERVER_MSG_SENT.labels(*values)
        self._handling = SERVER_HANDLING.labels(*values)
        self._handled: dict[grpc.StatusCode, Any] = {}

    @classmethod
    def of(cls, full_method: str, grpc_type: str) -> ServerLabels:
        service, _, method = full_method.lstrip("/").partition("/")
        return cls(grpc_type, service, method)

    def values(self) -> tuple[str, str, str]:
        return self._values

    def handled(self, code: grpc.StatusCode) -> Any:
        child = self._handled.get(code)
        if child is None:
            child = self._handled[code] = SERVER_HANDLED.labels(*self._values, go_code(code))
        return child


def server_started(labels: ServerLabels) -> None:
    labels._started.inc()
    # Every statecar RPC receives exactly one request message.
    labels._msg_received.inc()


def server_msg_sent(labels: ServerLabels) -> None:
    labels._msg_sent.inc()


def server_handled(labels: ServerLabels, code: grpc.StatusCode, seconds: float) -> None:
    labels.handled(code).inc()
    labels._handling.observe(seconds)

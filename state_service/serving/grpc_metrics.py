"""gRPC metrics with the names dashboards know (the go-grpc-prometheus family).

Label values follow go-grpc-prometheus too: grpc_type is unary, server_stream,
...; grpc_code is the Go spelling of the status (OK, NotFound, Unavailable).
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True, slots=True)
class ServerLabels:
    grpc_type: str
    grpc_service: str
    grpc_method: str

    @classmethod
    def of(cls, full_method: str, grpc_type: str) -> ServerLabels:
        service, _, method = full_method.lstrip("/").partition("/")
        return cls(grpc_type, service, method)

    def values(self) -> tuple[str, str, str]:
        return (self.grpc_type, self.grpc_service, self.grpc_method)


def server_started(labels: ServerLabels) -> None:
    SERVER_STARTED.labels(*labels.values()).inc()
    # Every statecar RPC receives exactly one request message.
    SERVER_MSG_RECEIVED.labels(*labels.values()).inc()


def server_msg_sent(labels: ServerLabels) -> None:
    SERVER_MSG_SENT.labels(*labels.values()).inc()


def server_handled(labels: ServerLabels, code: grpc.StatusCode, seconds: float) -> None:
    SERVER_HANDLED.labels(*labels.values(), go_code(code)).inc()
    SERVER_HANDLING.labels(*labels.values()).observe(seconds)

"""Client-side errors: gRPC failures of the state service, typed by meaning."""

from __future__ import annotations

import grpc

from shared_runtime.errors import error_info


class StateServiceError(Exception):
    """A call to the state service failed."""

    def __init__(
        self, code: grpc.StatusCode, message: str, reason: str, metadata: dict[str, str]
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.reason = reason
        self.metadata = metadata


class EtagMismatchError(StateServiceError):
    """ABORTED: the session changed since the etag was read."""

    @property
    def current_etag(self) -> str:
        return self.metadata.get("current_etag", "")


class SessionNotFoundError(StateServiceError):
    """NOT_FOUND: the session does not exist."""


class SessionAlreadyExistsError(StateServiceError):
    """ALREADY_EXISTS: the session to create (a fork's new session) exists."""


class InvalidRequestError(StateServiceError):
    """INVALID_ARGUMENT: the request was refused; nothing was written."""


class StateUnavailableError(StateServiceError):
    """UNAVAILABLE or DEADLINE_EXCEEDED: retry later; writes may be retried
    safely with the same request_id."""


_BY_CODE: dict[grpc.StatusCode, type[StateServiceError]] = {
    grpc.StatusCode.ABORTED: EtagMismatchError,
    grpc.StatusCode.NOT_FOUND: SessionNotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: SessionAlreadyExistsError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.UNAVAILABLE: StateUnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: StateUnavailableError,
}


def from_rpc_error(error: grpc.aio.AioRpcError) -> StateServiceError:
    info = error_info(error)
    code = error.code()
    cls = _BY_CODE.get(code, StateServiceError)
    return cls(
        code,
        error.details() or "",
        info.reason if info is not None else "",
        dict(info.metadata) if info is not None else {},
    )

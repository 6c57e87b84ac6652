"""The public Python API of the state service: `StateClient` for every RPC and
`StateServiceSession`, an openai-agents `Session`."""

from state_service.client._client import StateClient, channel_target
from state_service.client.errors import (
    EtagMismatchError,
    InvalidRequestError,
    SessionNotFoundError,
    StateServiceError,
    StateUnavailableError,
)
from state_service.client.session import StateServiceSession
from state_service.client.types import (
    AppendResult,
    Context,
    ItemsPage,
    NewItem,
    PopResult,
    SessionInfo,
    SessionsPage,
    StoredItem,
    WorkflowInfo,
)

__all__ = [
    "AppendResult",
    "Context",
    "EtagMismatchError",
    "InvalidRequestError",
    "ItemsPage",
    "NewItem",
    "PopResult",
    "SessionInfo",
    "SessionNotFoundError",
    "SessionsPage",
    "StateClient",
    "StateServiceError",
    "StateServiceSession",
    "StateUnavailableError",
    "StoredItem",
    "WorkflowInfo",
    "channel_target",
]

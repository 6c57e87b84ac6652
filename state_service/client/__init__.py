"""The public Python API of the state service: `StateClient` for every RPC and
`StateServiceSession`, an openai-agents `Session`."""

from state_service.client._client import StateClient, channel_target, service_config
from state_service.client.errors import (
    EtagMismatchError,
    InvalidRequestError,
    SessionNotFoundError,
    StateServiceError,
    StateUnavailableError,
)
from state_service.client.session import BudgetedSessionSettings, StateServiceSession
from state_service.client.types import (
    AppendResult,
    Context,
    ContextSummary,
    ItemsPage,
    NewItem,
    PopResult,
    RetrievedItem,
    SessionInfo,
    SessionsPage,
    StoredItem,
    TierShares,
    WorkflowInfo,
)

__all__ = [
    "AppendResult",
    "BudgetedSessionSettings",
    "Context",
    "ContextSummary",
    "EtagMismatchError",
    "InvalidRequestError",
    "ItemsPage",
    "NewItem",
    "PopResult",
    "RetrievedItem",
    "SessionInfo",
    "SessionNotFoundError",
    "SessionsPage",
    "StateClient",
    "StateServiceError",
    "StateServiceSession",
    "StateUnavailableError",
    "StoredItem",
    "TierShares",
    "WorkflowInfo",
    "channel_target",
    "service_config",
]

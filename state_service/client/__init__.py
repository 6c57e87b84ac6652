"""The public Python API of the state service: `StateClient` for every RPC and
`StateServiceSession`, an openai-agents `Session`.

`StateServiceSession` is imported on first use: it needs openai-agents, whose
import takes seconds, and most users of the client (the CLI, the agent
service's own state calls) never touch it."""

from typing import TYPE_CHECKING, Any

from state_service.client._client import StateClient, channel_target, service_config
from state_service.client.errors import (
    EtagMismatchError,
    InvalidRequestError,
    SessionAlreadyExistsError,
    SessionNotFoundError,
    StateServiceError,
    StateUnavailableError,
)
from state_service.client.types import (
    AppendResult,
    ClaimedRun,
    CompactedView,
    CompactResult,
    Context,
    ContextSummary,
    EraseResult,
    ForkResult,
    ItemRecord,
    ItemsPage,
    NewItem,
    PausedRun,
    PendingApproval,
    PopResult,
    RetrievedItem,
    SessionInfo,
    SessionsPage,
    StoredItem,
    TierShares,
    WorkflowInfo,
)

if TYPE_CHECKING:
    from state_service.client.session import BudgetedSessionSettings, StateServiceSession

_LAZY = frozenset({"BudgetedSessionSettings", "StateServiceSession"})


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from state_service.client import session

        return getattr(session, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AppendResult",
    "BudgetedSessionSettings",
    "ClaimedRun",
    "CompactResult",
    "CompactedView",
    "Context",
    "ContextSummary",
    "EraseResult",
    "EtagMismatchError",
    "ForkResult",
    "InvalidRequestError",
    "ItemRecord",
    "ItemsPage",
    "NewItem",
    "PausedRun",
    "PendingApproval",
    "PopResult",
    "RetrievedItem",
    "SessionAlreadyExistsError",
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

"""The agent service's application metrics (prefix statecar_agent_). Labels
carry agent, model and tool names from the agents file (bounded), never
session ids or message content."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import Counter, Histogram

from shared_runtime.build_info import register_build_info

BUILD_INFO = register_build_info("statecar_agent")

TURN_OUTCOMES = (
    "ok",
    "paused",
    "replayed",
    "conflict",
    "model_error",
    "deadline",
    "state_unavailable",
    "invalid",
    "cancelled",
    "error",
)

TURNS = Counter(
    "statecar_agent_turns_total",
    "Chat turns by outcome: ok, paused (waiting for tool approvals), replayed, conflict, "
    "model_error, deadline, state_unavailable, invalid, cancelled.",
    ["agent", "outcome"],
)
TURN_SECONDS = Histogram(
    "statecar_agent_turn_seconds",
    "Duration of a whole turn (context, model calls, tools, append).",
    ["agent"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
MODEL_SECONDS = Histogram(
    "statecar_agent_model_latency_seconds",
    "Duration of one model call (to the first complete response), by model.",
    ["model", "result"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
TOKENS = Counter(
    "statecar_agent_tokens_total", "Model tokens used, by kind: input or output.", ["kind"]
)
CONTEXT_TOKENS = Histogram(
    "statecar_agent_context_tokens",
    "Tokens of session context sent to the model per turn (as counted by the state service).",
    buckets=(0, 100, 250, 500, 1000, 2000, 4000, 8000, 16000, 32000, 64000, 128000),
)
TOOL_CALLS = Counter("statecar_agent_tool_calls_total", "Function tool calls, by tool.", ["tool"])
FORKS = Counter(
    "statecar_agent_forks_total",
    "ForkSession calls that created a session (a rewind or branch of a conversation).",
)
APPROVAL_PAUSES = Counter(
    "statecar_agent_approval_pauses_total",
    "Turns that paused on tools needing approval (stored for ResolveApprovals).",
    ["agent"],
)
APPROVAL_DECISIONS = Counter(
    "statecar_agent_approval_decisions_total",
    "Tool calls decided by a resume that ran, by decision: approve or reject.",
    ["decision"],
)
RESUME_OUTCOMES = ("ok", "paused_again", "replayed", "conflict", "resolved", "not_found", "error")
RESUMES = Counter(
    "statecar_agent_resumes_total",
    "ResolveApprovals calls by outcome: ok (resumed and stored), paused_again, replayed "
    "(a retry got the first response), conflict (another resume holds the run), resolved "
    "(another resume finished it), not_found (unknown or expired), error.",
    ["outcome"],
)
APPROVED_TOOL_RUNS = Counter(
    "statecar_agent_approved_tool_runs_total",
    "Executions of tools that need approval (each approved call should run once).",
    ["tool"],
)
CONTEXT_CACHE_OUTCOMES = ("hit", "miss", "stale")
CONTEXT_CACHE = Counter(
    "statecar_agent_context_cache_total",
    "Cacheable turns by how their context was found: hit (this replica's cached context, "
    "no GetContext), miss (GetContext), stale (the cached context was out of date: the "
    "append was refused and the turn, model call included, was redone on a fresh context).",
    ["outcome"],
)
HANDOFFS = Counter(
    "statecar_agent_handoffs_total", "Handoffs between agents.", ["from_agent", "to_agent"]
)


def initialize(
    agents: list[str], models: list[str], tools: list[str], gated_tools: Sequence[str] = ()
) -> None:
    """Creates every series at zero, so rate() sees a turn's first increase."""
    for agent in agents:
        for outcome in TURN_OUTCOMES:
            TURNS.labels(agent, outcome)
        TURN_SECONDS.labels(agent)
    for model in models:
        for result in ("ok", "error"):
            MODEL_SECONDS.labels(model, result)
    for kind in ("input", "output"):
        TOKENS.labels(kind)
    for tool in tools:
        TOOL_CALLS.labels(tool)
    for agent in agents:
        APPROVAL_PAUSES.labels(agent)
    for decision in ("approve", "reject"):
        APPROVAL_DECISIONS.labels(decision)
    for outcome in RESUME_OUTCOMES:
        RESUMES.labels(outcome)
    for tool in gated_tools:
        APPROVED_TOOL_RUNS.labels(tool)
    for outcome in CONTEXT_CACHE_OUTCOMES:
        CONTEXT_CACHE.labels(outcome)

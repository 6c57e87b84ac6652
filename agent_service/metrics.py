"""The agent service's application metrics (prefix statecar_agent_). Labels
carry agent, model and tool names from the agents file (bounded), never
session ids or message content."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from shared_runtime.build_info import register_build_info

BUILD_INFO = register_build_info("statecar_agent")

TURN_OUTCOMES = (
    "ok",
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
    "Chat turns by outcome: ok, replayed, conflict, model_error, deadline, "
    "state_unavailable, invalid, cancelled.",
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
HANDOFFS = Counter(
    "statecar_agent_handoffs_total", "Handoffs between agents.", ["from_agent", "to_agent"]
)


def initialize(agents: list[str], models: list[str], tools: list[str]) -> None:
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

"""The built-in offline model: deterministic, instant, no network, and honest
about what it is (every reply starts with "(offline model)").

It is an openai-agents `Model`, so everything around it (the runner, tools,
handoffs, streaming, the stored items) is the real code path. What it can do:

- answer a question from the context it is given, by finding the earlier
  statement that shares the most words with the question (the newest wins a
  tie, so later corrections beat earlier facts);
- call function tools and hand off to other agents when the message asks for
  them (time, arithmetic, notes, or the tool's / agent's name), then answer
  with the tools' outputs;
- stream its reply word by word.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from agents import FunctionTool, Handoff, ModelSettings, ModelTracing, Tool, Usage
from agents.agent_output import AgentOutputSchemaBase
from agents.items import ModelResponse, TResponseInputItem, TResponseStreamEvent
from agents.models.interface import Model
from openai.types.responses import (
    Response,
    ResponseCompletedEvent,
    ResponseCreatedEvent,
    ResponseFunctionToolCall,
    ResponseOutputMessage,
    ResponseOutputText,
    ResponseTextDeltaEvent,
    ResponseUsage,
)
from openai.types.responses.response_prompt_param import ResponsePromptParam
from openai.types.responses.response_usage import InputTokensDetails, OutputTokensDetails

from shared_runtime.items import item_text

MODEL_NAME = "statecar-offline"
PREFIX = "(offline model)"
# openai-agents names handoff tools transfer_to_<agent>.
HANDOFF_PREFIX = "transfer_to_"

_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9'_-]*")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_QUESTION_START = re.compile(
    r"^(what|who|whom|whose|when|where|which|why|how|do|does|did|is|are|was|were|can|could|"
    r"should|would|will|have|has|tell me|remind me)\b",
    re.IGNORECASE,
)
_STOPWORDS = frozenset(
    """a an the and or but if of to in on at by for with about from into over after before
    is are was were be been being am do does did have has had i me my mine you your yours we
    our us he she it its they them their this that these those what who whom whose when where
    which why how can could should would will shall may might must not no yes so than then
    there here tell remind please again earlier said say just also any some all""".split()
)
_EXPRESSION = re.compile(r"[-+(]*\d[\d.]*(?:\s*(?:\*\*|//|[-+*/%])\s*[-+(]*\d[\d.]*\)*)+")
_TIMEZONE = re.compile(r"\b([A-Z][a-z]+/[A-Za-z_]+(?:/[A-Za-z_]+)?)\b")
_TIME_WORDS = re.compile(r"\b(time|date|today|day is it|clock)\b", re.IGNORECASE)
_REMEMBER = re.compile(r"^\s*(?:please\s+)?(?:remember|note|save a note)\b[:,]?\s*(.+)$", re.I)
_LIST_NOTES = re.compile(r"\b(list|show|what are|read)\b.*\bnotes?\b", re.IGNORECASE)


def _words(text: str) -> set[str]:
    return {w.lower() for w in _WORD.findall(text)} - _STOPWORDS


def _as_dict(item: Any) -> Mapping[str, Any]:
    if isinstance(item, Mapping):
        return item
    dump = getattr(item, "model_dump", None)
    return dump(exclude_unset=True) if callable(dump) else {}


@dataclass(frozen=True)
class _Said:
    """Something said earlier in the conversation."""

    role: str
    text: str


@dataclass(frozen=True)
class _Conversation:
    earlier: list[_Said]
    message: str
    # Outputs of the tool calls made since the user's message: (tool, output).
    tool_results: list[tuple[str, str]]
    # Whether another agent already handed this message over.
    handed_off: bool

    @classmethod
    def of(cls, items: list[TResponseInputItem]) -> _Conversation:
        said: list[_Said] = []
        last_user = -1
        calls: dict[str, str] = {}
        for item in map(_as_dict, items):
            kind = item.get("type", "message")
            if kind == "message":
                role = str(item.get("role", ""))
                text = item_text(item)
                if role == "user":
                    last_user = len(said)
                said.append(_Said(role, text))
            elif kind == "function_call":
                calls[str(item.get("call_id"))] = str(item.get("name"))
            elif kind == "function_call_output":
                name = calls.get(str(item.get("call_id")), "tool")
                said.append(_Said(f"tool:{name}", item_text(item)))
        if last_user < 0:
            return cls(said, "", [], handed_off=False)
        results = [
            (s.role.removeprefix("tool:"), s.text)
            for s in said[last_user + 1 :]
            if s.role.startswith("tool:")
        ]
        handoffs = [r for r in results if r[0].startswith(HANDOFF_PREFIX)]
        return cls(
            said[:last_user],
            said[last_user].text,
            [r for r in results if r not in handoffs],
            handed_off=bool(handoffs),
        )


def _recall(question: str, earlier: list[_Said]) -> str | None:
    """The earlier sentence sharing the most content words with the question."""
    wanted = _words(question)
    if not wanted:
        return None
    best, best_score = None, 0
    for said in reversed(earlier):  # newest first: a later correction wins a tie
        # "system" items in the input are the state service's summaries.
        if said.role not in ("user", "assistant", "system") or said.text.startswith(PREFIX):
            continue
        for sentence in _SENTENCE_END.split(said.text):
            score = len(wanted & _words(sentence))
            if score > best_score:
                best, best_score = sentence.strip(), score
    return best


def _is_question(text: str) -> bool:
    return text.rstrip().endswith("?") or bool(_QUESTION_START.match(text.strip()))


def _tool_arguments(tool: FunctionTool, message: str) -> dict[str, Any] | None:
    """Arguments for `tool` if the message asks for it, else None."""
    name = tool.name
    if name == "current_time" and _TIME_WORDS.search(message):
        zone = _TIMEZONE.search(message)
        return {"timezone": zone.group(1)} if zone else {}
    if name == "calculate":
        expression = _EXPRESSION.search(message)
        return {"expression": expression.group(0).strip()} if expression else None
    if name == "save_note":
        note = _REMEMBER.match(message)
        return {"note": note.group(1).strip()} if note else None
    if name == "list_notes":
        return {} if _LIST_NOTES.search(message) else None
    if name.lower() in message.lower() or name.replace("_", " ").lower() in message.lower():
        properties = tool.params_json_schema.get("properties", {})
        return {
            key: message
            for key, schema in properties.items()
            if isinstance(schema, Mapping) and schema.get("type") == "string"
        }
    return None


def _choose_handoff(handoffs: Iterable[Handoff], message: str) -> Handoff | None:
    words = {w.lower() for w in _WORD.findall(message)}
    for handoff in handoffs:
        if handoff.agent_name.lower() in words:
            return handoff
    return None


def _digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:24]


def _estimate_tokens(value: Any) -> int:
    return len(json.dumps(value, default=str, ensure_ascii=False)) // 4 + 1


class OfflineModel(Model):
    """See the module docstring. Stateless: the same input gives the same output."""

    def _decide(
        self,
        system_instructions: str | None,
        input: str | list[TResponseInputItem],
        tools: list[Tool],
        handoffs: list[Handoff],
    ) -> tuple[list[Any], Usage]:
        items: list[TResponseInputItem] = (
            [{"role": "user", "content": input}] if isinstance(input, str) else list(input)
        )
        conversation = _Conversation.of(items)
        key = _digest(len(items), conversation.message, len(conversation.tool_results))
        output: list[Any] = []
        if not conversation.tool_results:
            handoff = (
                None if conversation.handed_off else _choose_handoff(handoffs, conversation.message)
            )
            if handoff is not None:
                output.append(_call(handoff.tool_name, {}, key))
            else:
                for tool in tools:
                    if isinstance(tool, FunctionTool):
                        arguments = _tool_arguments(tool, conversation.message)
                        if arguments is not None:
                            output.append(_call(tool.name, arguments, f"{key}{len(output)}"))
        if not output:
            output.append(_message(self._reply(conversation), key))
        usage = Usage(
            requests=1,
            input_tokens=_estimate_tokens([system_instructions, items]),
            output_tokens=_estimate_tokens([_as_dict(o) for o in output]),
        )
        usage.total_tokens = usage.input_tokens + usage.output_tokens
        return output, usage

    @staticmethod
    def _reply(conversation: _Conversation) -> str:
        message = conversation.message.strip()
        if conversation.tool_results:
            results = "; ".join(f"{name} returned {out}" for name, out in conversation.tool_results)
            return f"{PREFIX} {results}."
        if not message:
            return f"{PREFIX} I got no message to answer."
        if _is_question(message):
            found = _recall(message, conversation.earlier)
            if found is not None:
                return f'{PREFIX} From earlier in this conversation: "{found}"'
            return (
                f"{PREFIX} I found nothing about that in the {len(conversation.earlier)} "
                "earlier items of this conversation. I am the built-in offline model: I can "
                "recall what was said, do arithmetic, tell the time and keep notes; configure "
                "a model endpoint for real answers."
            )
        return (
            f"{PREFIX} Noted: {message} "
            f"({len(conversation.earlier)} earlier items of this conversation in context)"
        )

    async def get_response(
        self,
        system_instructions: str | None,
        input: str | list[TResponseInputItem],
        model_settings: ModelSettings,
        tools: list[Tool],
        output_schema: AgentOutputSchemaBase | None,
        handoffs: list[Handoff],
        tracing: ModelTracing,
        *,
        previous_response_id: str | None,
        conversation_id: str | None,
        prompt: ResponsePromptParam | None,
    ) -> ModelResponse:
        output, usage = self._decide(system_instructions, input, tools, handoffs)
        return ModelResponse(output=output, usage=usage, response_id=None)

    async def stream_response(
        self,
        system_instructions: str | None,
        input: str | list[TResponseInputItem],
        model_settings: ModelSettings,
        tools: list[Tool],
        output_schema: AgentOutputSchemaBase | None,
        handoffs: list[Handoff],
        tracing: ModelTracing,
        *,
        previous_response_id: str | None,
        conversation_id: str | None,
        prompt: ResponsePromptParam | None,
    ) -> AsyncIterator[TResponseStreamEvent]:
        output, usage = self._decide(system_instructions, input, tools, handoffs)
        response_id = f"resp_offline_{_digest(output[0].id)}"
        sequence = 0
        yield ResponseCreatedEvent(
            type="response.created",
            response=_response(response_id, [], usage, "in_progress"),
            sequence_number=sequence,
        )
        for index, item in enumerate(output):
            if not isinstance(item, ResponseOutputMessage):
                continue
            text = item.content[0].text if isinstance(item.content[0], ResponseOutputText) else ""
            for piece in re.findall(r"\S+\s*", text):
                sequence += 1
                yield ResponseTextDeltaEvent(
                    type="response.output_text.delta",
                    item_id=item.id,
                    output_index=index,
                    content_index=0,
                    delta=piece,
                    logprobs=[],
                    sequence_number=sequence,
                )
        yield ResponseCompletedEvent(
            type="response.completed",
            response=_response(response_id, output, usage, "completed"),
            sequence_number=sequence + 1,
        )


def _call(name: str, arguments: Mapping[str, Any], key: str) -> ResponseFunctionToolCall:
    return ResponseFunctionToolCall(
        id=f"fc_offline_{key}",
        call_id=f"call_offline_{key}",
        type="function_call",
        name=name,
        arguments=json.dumps(arguments, ensure_ascii=False),
        status="completed",
    )


def _message(text: str, key: str) -> ResponseOutputMessage:
    return ResponseOutputMessage(
        id=f"msg_offline_{key}",
        type="message",
        role="assistant",
        status="completed",
        content=[ResponseOutputText(type="output_text", text=text, annotations=[], logprobs=[])],
    )


def _response(response_id: str, output: list[Any], usage: Usage, status: Any) -> Response:
    return Response(
        id=response_id,
        created_at=0,
        model=MODEL_NAME,
        object="response",
        output=output,
        tool_choice="auto",
        tools=[],
        top_p=None,
        parallel_tool_calls=False,
        status=status,
        usage=ResponseUsage(
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            total_tokens=usage.total_tokens,
            # model_construct: the details grow fields across openai releases.
            input_tokens_details=InputTokensDetails.model_construct(cached_tokens=0),
            output_tokens_details=OutputTokensDetails.model_construct(reasoning_tokens=0),
        ),
    )

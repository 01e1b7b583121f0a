"""Reasoning + tool-call parsing of one chat choice, as the server needs it (spec §6-§8, §12b).

Reasoning runs first; the tool parser sees only the content after reasoning ended, and only when the request has
tools (with tool_choice auto/required/named — the server decides and passes `tools=None` otherwise, so tool XML
stays content). `parse_chat_output` is the non-streaming path; `ChatStreamParser` is the streaming twin whose joined
fragments equal it for every split of the text. Fragments are OpenAI `delta` dicts: reasoning goes out under both
`reasoning` (vLLM) and `reasoning_content` (SGLang/DeepSeek clients); tool calls get `call_<24 hex>` ids in both modes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fp4serve.parsers.qwen3_coder import ToolCallStream, join_fragments
from fp4serve.parsers.reasoning import ReasoningStream, parse_reasoning


@dataclass(frozen=True)
class ChatOutput:
    reasoning: str | None
    content: str | None
    # OpenAI message tool calls: {"id", "type": "function", "function": {"name", "arguments"}}
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


def parse_chat_output(text: str, tools: list[dict[str, Any]] | None = None, thinking: bool = True) -> ChatOutput:
    """Non-streaming: split a finished output into reasoning, content and tool calls."""
    reasoning, content = parse_reasoning(text, thinking)
    if not tools or content is None:
        return ChatOutput(reasoning, content)
    stream = ToolCallStream(tools)
    content, calls = join_fragments(stream.feed(content) + stream.finish())
    tool_calls = [
        {"id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}
        for call in calls
    ]
    return ChatOutput(reasoning, content, tool_calls)


class ChatStreamParser:
    """Streaming: `feed(delta_text)` and `finish()` return lists of OpenAI delta fragments.

    Fragments: `{"reasoning": s, "reasoning_content": s}`, `{"content": s}`, a tool-call header
    `{"tool_calls": [{"index", "id", "type": "function", "function": {"name", "arguments": ""}}]}` sent once per call,
    then argument pieces `{"tool_calls": [{"index", "function": {"arguments": piece}}]}`. When tools are active,
    `finish()` ends with `{"content": ""}` as vLLM's tool parser does at end of stream.
    """

    def __init__(self, tools: list[dict[str, Any]] | None = None, thinking: bool = True) -> None:
        self._reasoning = ReasoningStream(thinking)
        self._tools = ToolCallStream(tools) if tools else None
        self._finished = False

    @property
    def num_tool_calls(self) -> int:
        """Tool calls started so far (finish_reason is "tool_calls" when this is non-zero)."""
        return self._tools.num_calls if self._tools is not None else 0

    def feed(self, delta_text: str) -> list[dict[str, Any]]:
        if self._finished:
            raise ValueError("ChatStreamParser.feed called after finish()")
        reasoning, content = self._reasoning.feed(delta_text)
        return self._fragments(reasoning, content, final=False)

    def finish(self) -> list[dict[str, Any]]:
        if self._finished:
            return []
        self._finished = True
        reasoning, content = self._reasoning.finish()
        out = self._fragments(reasoning, content, final=True)
        if self._tools is not None:
            out.append({"content": ""})
        return out

    def _fragments(self, reasoning: str, content: str, final: bool) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if reasoning:
            out.append({"reasoning": reasoning, "reasoning_content": reasoning})
        if self._tools is None:
            if content:
                out.append({"content": content})
            return out
        if content:
            out.extend(self._tools.feed(content))
        if final:
            out.extend(self._tools.finish())
        return out


def join_stream(fragments: list[dict[str, Any]]) -> ChatOutput:
    """Join stream fragments the way a client does (empty strings count as absent); ids come from the headers."""
    reasoning = "".join(f.get("reasoning", "") for f in fragments)
    content, calls = join_fragments([f for f in fragments if "reasoning" not in f])
    tool_calls = [
        {"id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}
        for call in calls
    ]
    return ChatOutput(reasoning or None, content, tool_calls)

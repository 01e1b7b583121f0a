"""Output parsers for Qwen3.5 chat: the `qwen3` reasoning parser and the `qwen3_coder` tool-call parser.

Pure Python (no torch), usable without the server. One-shot functions serve non-streaming responses; the stream
parser serves SSE and joins to exactly the one-shot result for any split of the text (spec §8, §9, §12b).
"""

from __future__ import annotations

from fp4serve.parsers.chat import ChatOutput, ChatStreamParser, join_stream, parse_chat_output
from fp4serve.parsers.qwen3_coder import ToolCallStream, parse_tool_calls
from fp4serve.parsers.reasoning import ReasoningStream, parse_reasoning, thinking_from_prompt
from fp4serve.parsers.values import convert_value

__all__ = [
    "ChatOutput",
    "ChatStreamParser",
    "ReasoningStream",
    "ToolCallStream",
    "convert_value",
    "join_stream",
    "parse_chat_output",
    "parse_reasoning",
    "parse_tool_calls",
    "thinking_from_prompt",
]

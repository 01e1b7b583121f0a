"""Shared tools, text builders and stream runners for the parser tests (spec §13 notation)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from typing import Any

from fp4serve.parsers import ChatStreamParser, join_stream, parse_chat_output

CALL_ID = re.compile(r"call_[0-9a-f]{24}")


def tool(name: str, properties: dict[str, Any]) -> dict[str, Any]:
    parameters = {"type": "object", "properties": properties}
    return {"type": "function", "function": {"name": name, "description": None, "parameters": parameters}}


# §13: tool f with s:string, i:integer, n:number, b:boolean, o:object, a:array, e:string+enum, u:anyOf[string,null],
# t:type ["integer","null"]; tool g with x:string
F = tool(
    "f",
    {
        "s": {"type": "string"},
        "i": {"type": "integer"},
        "n": {"type": "number"},
        "b": {"type": "boolean"},
        "o": {"type": "object"},
        "a": {"type": "array"},
        "e": {"type": "string", "enum": ["red", "green"]},
        "u": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "t": {"type": ["integer", "null"]},
    },
)
G = tool("g", {"x": {"type": "string"}})
TOOLS = [F, G]


def call(name: str = "f", *params: tuple[str, str]) -> str:
    """`CALL(k=v, …)` of §13: the template's exact multi-line format."""
    body = "".join(f"<parameter={key}>\n{value}\n</parameter>\n" for key, value in params)
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


def run_stream(
    deltas: Iterable[str], tools: list[dict[str, Any]] | None = None, thinking: bool = True
) -> list[dict[str, Any]]:
    parser = ChatStreamParser(tools=tools, thinking=thinking)
    fragments: list[dict[str, Any]] = []
    for delta in deltas:
        fragments.extend(parser.feed(delta))
    fragments.extend(parser.finish())
    check_fragments(fragments)
    return fragments


def split_at(text: str, cuts: Sequence[int]) -> list[str]:
    bounds = [0, *sorted(set(cuts)), len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def check_fragments(fragments: list[dict[str, Any]]) -> None:
    """Shape rules every stream must follow, whatever the text."""
    headers = 0
    for fragment in fragments:
        assert len(fragment) >= 1
        if "reasoning" in fragment:
            assert fragment == {"reasoning": fragment["reasoning"], "reasoning_content": fragment["reasoning"]}
            assert fragment["reasoning"]
        elif "content" in fragment:
            assert set(fragment) == {"content"} and isinstance(fragment["content"], str)
        else:
            (entry,) = fragment["tool_calls"]
            if "id" in entry:
                assert entry["index"] == headers, "headers come once per call, in index order"
                assert CALL_ID.fullmatch(entry["id"]) and entry["type"] == "function"
                assert entry["function"]["arguments"] == "" and entry["function"]["name"]
                headers += 1
            else:
                assert set(entry) == {"index", "function"} and set(entry["function"]) == {"arguments"}
                assert entry["index"] == headers - 1, "arguments only for the call in progress"
    # only the closing {"content": ""} may be empty
    assert all(f.get("content", "x") != "" for f in fragments[:-1])
    for tool_call in join_stream(fragments).tool_calls:
        assert isinstance(json.loads(tool_call["function"]["arguments"]), dict)


def essence(output: Any) -> tuple[str | None, str | None, list[tuple[str, str]]]:
    """A ChatOutput without the random ids."""
    calls = [(c["function"]["name"], c["function"]["arguments"]) for c in output.tool_calls]
    return output.reasoning, output.content, calls


def assert_stream_matches(
    text: str, deltas: Sequence[str], tools: list[dict[str, Any]] | None, thinking: bool
) -> list[dict[str, Any]]:
    assert "".join(deltas) == text
    fragments = run_stream(deltas, tools, thinking)
    assert essence(join_stream(fragments)) == essence(parse_chat_output(text, tools, thinking))
    return fragments


def arguments(call_xml_text: str, tools: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Arguments of the single call in a text, parsed both ways and checked equal."""
    from fp4serve.parsers import parse_tool_calls

    content, calls = parse_tool_calls(call_xml_text, TOOLS if tools is None else tools)
    assert len(calls) == 1, calls
    streamed = join_stream(run_stream(list(call_xml_text), TOOLS if tools is None else tools, thinking=False))
    assert streamed.tool_calls[0]["function"]["arguments"] == calls[0]["arguments"]
    return json.loads(calls[0]["arguments"])

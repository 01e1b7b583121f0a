"""The public conformance cases of spec §13 (tool parser 1-29, reasoning parser 33-43), non-streaming and streamed.

Each streamed case is replayed three ways: token by token with the real Qwen3.5 tokenizer, character by character,
and as one delta; the joined stream must equal the non-streaming result every time.
"""

from __future__ import annotations

import json

import pytest
from parser_cases import CALL_ID, TOOLS, assert_stream_matches, call, run_stream

from fp4serve.parsers import (
    ChatStreamParser,
    join_stream,
    parse_chat_output,
    parse_reasoning,
    parse_tool_calls,
    thinking_from_prompt,
)


def streamed_three_ways(text, token_split, tools=TOOLS, thinking=False):
    for deltas in (token_split(text), list(text), [text]):
        assert_stream_matches(text, deltas, tools, thinking)
    return join_stream(run_stream(token_split(text), tools, thinking))


def only_args(text):
    content, calls = parse_tool_calls(text, TOOLS)
    assert len(calls) == 1 and calls[0]["name"] == "f"
    return calls[0]["arguments"]


def test_case_1_plain_text(token_split):
    out = parse_chat_output("Hello there.", TOOLS, thinking=False)
    assert (out.content, out.tool_calls) == ("Hello there.", [])
    assert parse_tool_calls("Hello there.", TOOLS) == ("Hello there.", [])
    fragments = run_stream(token_split("Hello there."), TOOLS, thinking=False)
    assert "".join(f["content"] for f in fragments) == "Hello there."
    assert fragments[-1] == {"content": ""}
    streamed_three_ways("Hello there.", token_split)


def test_case_2_single_call(token_split):
    text = call("f", ("s", "Paris"))
    assert parse_tool_calls(text, TOOLS) == (None, [{"name": "f", "arguments": '{"s": "Paris"}'}])
    out = parse_chat_output(text, TOOLS, thinking=False)
    assert out.content is None
    assert out.tool_calls[0]["type"] == "function" and CALL_ID.fullmatch(out.tool_calls[0]["id"])
    fragments = run_stream(token_split(text), TOOLS, thinking=False)
    assert all(f["content"] == "" for f in fragments if "content" in f)
    assert streamed_three_ways(text, token_split).content is None


def test_case_3_content_before_call_is_not_trimmed(token_split):
    text = "Let me check.\n\n" + call("f", ("s", "Paris"))
    content, calls = parse_tool_calls(text, TOOLS)
    assert content == "Let me check.\n\n" and len(calls) == 1
    assert streamed_three_ways(text, token_split).content == "Let me check.\n\n"


@pytest.mark.parametrize(
    ("key", "raw", "expected"),
    [
        ("i", "42", '{"i": 42}'),
        ("i", "-7", '{"i": -7}'),
        ("i", "4.0", '{"i": "4.0"}'),
        ("i", "abc", '{"i": "abc"}'),
        ("n", "3.14", '{"n": 3.14}'),
        ("n", "5.0", '{"n": 5}'),
        ("n", "5", '{"n": 5}'),
        ("n", "1e3", '{"n": 1000}'),
        ("n", "five", '{"n": "five"}'),
        ("b", "True", '{"b": true}'),
        ("b", "false", '{"b": false}'),
        ("b", "yes", '{"b": false}'),
        ("a", '["a", 1, true]', '{"a": ["a", 1, true]}'),
        ("a", "['a', 1, True]", '{"a": ["a", 1, true]}'),
    ],
    ids=lambda v: str(v),
)
def test_cases_5_6_7_9_typed_values(key, raw, expected, token_split):
    text = call("f", (key, raw))
    assert only_args(text) == expected
    streamed = streamed_three_ways(text, token_split)
    assert streamed.tool_calls[0]["function"]["arguments"] == expected


def test_case_15_no_newlines(token_split):
    text = "<tool_call><function=f><parameter=s>Paris</parameter><parameter=i>3</parameter></function></tool_call>"
    assert only_args(text) == '{"s": "Paris", "i": 3}'
    streamed_three_ways(text, token_split)


def test_case_17_no_parameters(token_split):
    text = "<tool_call>\n<function=f>\n</function>\n</tool_call>"
    assert only_args(text) == "{}"
    streamed_three_ways(text, token_split)


def test_case_19_two_calls(token_split):
    text = call("f", ("s", "A")) + "\n" + call("g", ("x", "B"))
    content, calls = parse_tool_calls(text, TOOLS)
    assert content is None
    assert calls == [{"name": "f", "arguments": '{"s": "A"}'}, {"name": "g", "arguments": '{"x": "B"}'}]
    parser = ChatStreamParser(TOOLS, thinking=False)
    fragments = [f for delta in token_split(text) for f in parser.feed(delta)] + parser.finish()
    headers = [f["tool_calls"][0] for f in fragments if "tool_calls" in f and "id" in f["tool_calls"][0]]
    assert [(h["index"], h["function"]["name"]) for h in headers] == [(0, "f"), (1, "g")]
    assert headers[0]["id"] != headers[1]["id"]
    assert parser.num_tool_calls == 2  # the server's finish_reason "tool_calls"
    streamed_three_ways(text, token_split)


def test_case_21_missing_parameter_close(token_split):
    text = "<tool_call>\n<function=f>\n<parameter=s>\nDallas\n<parameter=i>\n5\n</parameter>\n</function>\n</tool_call>"
    assert only_args(text) == '{"s": "Dallas", "i": 5}'
    streamed = streamed_three_ways(text, token_split)
    assert streamed.tool_calls[0]["function"]["arguments"] == '{"s": "Dallas", "i": 5}'


def test_case_29_streaming_shape(token_split):
    text = "Sure." + call("f", ("s", "Paris"), ("i", "3"))
    deltas = token_split(text)
    assert deltas[:2] == ["Sure", "."]
    parser = ChatStreamParser(TOOLS, thinking=False)
    fragments = [f for delta in deltas for f in parser.feed(delta)]
    fragments += parser.finish()
    assert fragments[0] == {"content": "Sure"} and fragments[1] == {"content": "."}
    header = fragments[2]["tool_calls"][0]
    assert CALL_ID.fullmatch(header.pop("id"))
    assert header == {"index": 0, "type": "function", "function": {"name": "f", "arguments": ""}}
    pieces = [f["tool_calls"][0]["function"]["arguments"] for f in fragments[3:-1]]
    assert pieces == ["{", '"s": "Paris"', ', "i": 3', "}"]
    assert fragments[-1] == {"content": ""}
    assert parser.num_tool_calls == 1


@pytest.mark.parametrize(
    ("text", "reasoning", "content"),
    [
        ("This is reasoning</think>This is content", "This is reasoning", "This is content"),  # 33
        ("This is reasoning</think>", "This is reasoning", None),  # 34
        ("<think>This is reasoning</think>This is content", "This is reasoning", "This is content"),  # 35
        ("just text", "just text", None),  # 36
        ("\nplan step\n</think>\n\nFinal answer.", "\nplan step\n", "\n\nFinal answer."),  # 38
    ],
    ids=["33", "34", "35", "36", "38"],
)
@pytest.mark.parametrize("tools", [None, TOOLS], ids=["no_tools", "tools"])
def test_cases_33_to_38_reasoning(text, reasoning, content, tools, token_split):
    assert parse_reasoning(text, thinking=True) == (reasoning, content)
    out = parse_chat_output(text, tools, thinking=True)
    assert (out.reasoning, out.content, out.tool_calls) == (reasoning, content, [])
    for deltas in (token_split(text), list(text), [text]):
        assert_stream_matches(text, deltas, tools, thinking=True)


def test_case_36_thinking_disabled(token_split):
    assert parse_reasoning("just text", thinking=False) == (None, "just text")
    assert_stream_matches("just text", token_split("just text"), None, thinking=False)


def test_case_43_prompt_decides_thinking(token_split):
    prompt = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    thinking = thinking_from_prompt(prompt)
    assert thinking is False
    out = parse_chat_output("Hello!", TOOLS, thinking)
    assert (out.reasoning, out.content) == (None, "Hello!")
    fragments = run_stream(token_split("Hello!"), TOOLS, thinking)
    assert "".join(f.get("content", "") for f in fragments) == "Hello!"
    assert not any("reasoning" in f for f in fragments)
    assert thinking_from_prompt("<|im_start|>assistant\n<think>\n") is True


def test_mixed_types_in_one_call():
    text = call("f", ("o", '{"k": [1, 2]}'), ("e", "red"), ("u", "null"), ("t", "7"))
    assert json.loads(only_args(text)) == {"o": {"k": [1, 2]}, "e": "red", "u": None, "t": 7}

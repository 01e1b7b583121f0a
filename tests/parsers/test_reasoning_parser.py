"""The qwen3 reasoning parser: vLLM's reasoning test cases (spec §9.5) and the §12b decisions, one-shot and streamed."""

from __future__ import annotations

import json

import pytest
from parser_cases import TOOLS, assert_stream_matches, call, run_stream

from fp4serve.parsers import (
    ChatStreamParser,
    ReasoningStream,
    join_stream,
    parse_chat_output,
    parse_reasoning,
    thinking_from_prompt,
)

TOOL_CALL_BODY = (
    "<tool_call>\n<function=bash>\n<parameter=command>\ncat /etc/hosts\n</parameter>\n</function>\n</tool_call>"
)


@pytest.mark.parametrize(
    ("text", "reasoning", "content"),
    [
        ("This is a reasoning section</think>This is the rest", "This is a reasoning section", "This is the rest"),
        ("This is a reasoning section</think>", "This is a reasoning section", None),
        (
            "<think>This is a reasoning section</think>This is the rest",
            "This is a reasoning section",
            "This is the rest",
        ),
        ("This is the rest", "This is the rest", None),
        ("<think>This is a reasoning section</think>", "This is a reasoning section", None),
        (
            "<think>This is a reasoning\nsection</think>This is the rest\nThat",
            "This is a reasoning\nsection",
            "This is the rest\nThat",
        ),
        ("<think>This is a reasoning section", "This is a reasoning section", None),
        ("I need to read the file.\n\n" + TOOL_CALL_BODY, "I need to read the file.\n\n", TOOL_CALL_BODY),
        ("<think>I need to read the file.\n\n" + TOOL_CALL_BODY, "I need to read the file.\n\n", TOOL_CALL_BODY),
    ],
    ids=[
        "without_start_token",
        "without_start_token_complete_reasoning",
        "with_think",
        "without_think",
        "complete_reasoning",
        "multiline_reasoning",
        "only_open_tag",
        "tool_call_no_think_end",
        "tool_call_with_think_no_end",
    ],
)
def test_reasoning_cases(text, reasoning, content, token_split):
    assert parse_reasoning(text) == (reasoning, content)
    for deltas in (token_split(text), list(text), [text]):
        fragments = assert_stream_matches(text, deltas, None, thinking=True)
        joined = join_stream(fragments)
        assert (joined.reasoning, joined.content) == (reasoning, content)


@pytest.mark.parametrize(
    ("deltas", "reasoning", "content"),
    [
        (
            ["<think>This is a reasoning section", "</think>", "This is the rest"],
            "This is a reasoning section",
            "This is the rest",
        ),
        (["reasoning section", "</think>This is the rest"], "reasoning section", "This is the rest"),
        (["<think>reasoning</think>"], "reasoning", None),
        (["reasoning section", "</think>content"], "reasoning section", "content"),
        (
            ["I need to read the file.\n\n", "<tool_call>\n<function=bash>"],
            "I need to read the file.\n\n",
            "<tool_call>\n<function=bash>",
        ),
    ],
    ids=[
        "start_token_grouped_with_text",
        "end_token_grouped_with_content",
        "start_and_end_in_one_delta_no_content",
        "no_start_end_grouped_with_content",
        "tool_call_implicit_reasoning_end",
    ],
)
def test_multi_token_deltas(deltas, reasoning, content):
    joined = join_stream(assert_stream_matches("".join(deltas), deltas, None, thinking=True))
    assert (joined.reasoning, joined.content) == (reasoning, content)


@pytest.mark.parametrize(
    "text",
    ["This is plain content", "Some output without think tokens", "I need to read the file.\n\n" + TOOL_CALL_BODY],
)
def test_thinking_disabled(text, token_split):
    assert parse_reasoning(text, thinking=False) == (None, text)
    joined = join_stream(assert_stream_matches(text, token_split(text), None, thinking=False))
    assert (joined.reasoning, joined.content) == (None, text)


def test_tool_call_in_unclosed_think_is_parsed_as_call(token_split):
    text = "Let me look it up.\n" + call("f", ("s", "Paris"), ("i", "2"))
    out = parse_chat_output(text, TOOLS, thinking=True)
    assert out.reasoning == "Let me look it up.\n" and out.content is None
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in out.tool_calls] == [
        ("f", {"s": "Paris", "i": 2})
    ]
    for deltas in (token_split(text), list(text)):
        assert_stream_matches(text, deltas, TOOLS, thinking=True)


@pytest.mark.parametrize(
    ("text", "reasoning", "content"),
    [
        # a <tool_call> that is not followed by <function stays reasoning text
        ("I could use <tool_call> here.", "I could use <tool_call> here.", None),
        ("mention <tool_call>\n<func", "mention <tool_call>\n<func", None),
        ("see <tool_call></think>done", "see <tool_call>", "done"),
        # `<function ` (with a space) also ends reasoning, as in vLLM
        ("r<tool_call> <function name=x>", "r", "<tool_call> <function name=x>"),
        # the first end wins: a real call before </think> ends reasoning, the later tag is content
        ("r" + TOOL_CALL_BODY + "</think>x", "r", TOOL_CALL_BODY + "</think>x"),
        # a second </think> stays in content; only the first <think> of the reasoning is removed
        ("a</think>b</think>c", "a", "b</think>c"),
        ("a<think>b<think>c</think>d", "ab<think>c", "d"),
        ("</think>only content", None, "only content"),
        ("", None, None),
        ("</thi", "</thi", None),
    ],
)
def test_edge_cases(text, reasoning, content, token_split):
    assert parse_reasoning(text) == (reasoning, content)
    for deltas in (token_split(text), list(text), [text]):
        assert_stream_matches(text, deltas, None, thinking=True)
        assert_stream_matches(text, deltas, TOOLS, thinking=True)


def test_stream_holds_back_partial_tags():
    stream = ReasoningStream(thinking=True)
    assert stream.feed("abc</thi") == ("abc", "")
    assert stream.feed("nk>rest") == ("", "rest")
    assert stream.feed("</think>") == ("", "</think>")
    stream = ReasoningStream(thinking=True)
    assert stream.feed("x<tool_ca") == ("x", "")
    assert stream.feed("ll>\n  ") == ("", "")
    assert stream.feed("<function") == ("", "")
    assert stream.feed("=f>") == ("", "<tool_call>\n  <function=f>")
    stream = ReasoningStream(thinking=True)
    assert stream.feed("x<tool_call>\n") == ("x", "")
    assert stream.feed("no") == ("<tool_call>\nno", "")
    assert stream.finish() == ("", "")


def test_stream_finish_releases_held_text():
    parser = ChatStreamParser(thinking=True)
    assert parser.feed("thinking <tool_call>") == [{"reasoning": "thinking ", "reasoning_content": "thinking "}]
    assert parser.finish() == [{"reasoning": "<tool_call>", "reasoning_content": "<tool_call>"}]
    assert parser.finish() == []
    with pytest.raises(ValueError, match="after finish"):
        parser.feed("more")


@pytest.mark.parametrize(
    ("prompt", "thinking"),
    [
        ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n", True),
        ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n", False),
        # an earlier turn's closed think block does not matter, the generation prompt's tag is last
        ("<|im_start|>assistant\n<think>\nold\n</think>\n\nok<|im_end|>\n<|im_start|>assistant\n<think>\n", True),
        ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", True),
    ],
)
def test_thinking_from_prompt(prompt, thinking):
    assert thinking_from_prompt(prompt) is thinking


def test_thinking_from_prompt_default_without_tags():
    assert thinking_from_prompt("plain prompt", default=False) is False


def test_reasoning_fragments_carry_both_field_names():
    fragments = run_stream(["plan", "</think>", "answer"], None, thinking=True)
    assert fragments == [
        {"reasoning": "plan", "reasoning_content": "plan"},
        {"content": "answer"},
    ]

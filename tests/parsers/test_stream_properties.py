"""Property tests: any split of a text into stream deltas joins to the one-shot result (spec §7-§9, issue 8).

Texts are built from the pieces that matter — reasoning, `</think>`/`<think>`, content, tool calls with typed,
missing, repeated or unknown parameters, literal tags inside values, malformed names, truncation anywhere — and from
a soup of tag fragments that cuts tags at every character. Runs are derandomized so CI sees the same examples.
"""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from parser_cases import TOOLS, assert_stream_matches, call, split_at

from fp4serve.parsers import parse_tool_calls

PROPERTY_SETTINGS = settings(
    max_examples=120,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

VALUES = st.sampled_from(
    ["Paris", "42", "-7", "4.0", "3.14", "1e3", "true", "yes", "null", "None", "{'k': 1}", '["a", 1, true]',
     '{"k": [1, 2]}', "", "\n", "  two\nlines  ", "naïve 日本", "a < b > c", "</parameter>", "<parameter=s>",
     "</function>\n</tool_call>", "<tool_call>\n<function=g>"]
)  # fmt: skip
PARAM_NAMES = st.sampled_from(["s", "i", "n", "b", "o", "a", "e", "u", "t", "x", "zz"])
FUNCTION_NAMES = st.sampled_from(["f", "f", "g", "other_tool", "bad name", "{{ x }}", ""])
PROSE = st.sampled_from(["Let me check.", "ok", " ", "\n", "\n\n", "Done!", "x<y", "naïve", "<", "a>b", "<think"])
TAG_SOUP = st.sampled_from(
    ["<tool_call>", "</tool_call>", "<function=f>", "<function=g>", "<function=", "</function>", "<parameter=s>",
     "<parameter=i>", "<parameter=", "</parameter>", "<think>", "</think>", "<tool_", "call>", "</para", "meter>",
     "<func", "tion=f>", "\n", " ", "Paris", "7", "<", ">", "/", "=", "f", "é"]
)  # fmt: skip


@st.composite
def tool_call_text(draw: st.DrawFn) -> str:
    opener = draw(st.sampled_from(["<tool_call>\n", "<tool_call>", "<tool_call>\n\n", ""]))
    newline = draw(st.sampled_from(["\n", ""]))
    body = []
    for _ in range(draw(st.integers(0, 3))):
        close = draw(st.sampled_from(["</parameter>", "</parameter>", ""]))
        body.append(f"<parameter={draw(PARAM_NAMES)}>{newline}{draw(VALUES)}{newline}{close}{newline}")
    function_close = draw(st.sampled_from(["</function>", "</function>", ""]))
    call_close = draw(st.sampled_from([f"{newline}</tool_call>", f"{newline}</tool_call>", ""]))
    return f"{opener}<function={draw(FUNCTION_NAMES)}>{newline}{''.join(body)}{function_close}{call_close}"


@st.composite
def chat_text(draw: st.DrawFn) -> str:
    pieces = draw(
        st.lists(
            st.one_of(PROSE, tool_call_text(), st.sampled_from(["</think>", "<think>", "\n"]), TAG_SOUP),
            max_size=6,
        )
    )
    text = "".join(pieces)
    if text and draw(st.booleans()):
        text = text[: draw(st.integers(0, len(text)))]
    return text


@st.composite
def text_and_cuts(draw: st.DrawFn, texts: st.SearchStrategy[str]) -> tuple[str, list[int]]:
    text = draw(texts)
    cuts = draw(st.lists(st.integers(0, len(text)), max_size=12)) if text else []
    return text, cuts


def check_all_modes(text: str, cuts: list[int]) -> None:
    for deltas in (split_at(text, cuts), list(text)):
        for tools in (None, TOOLS):
            for thinking in (True, False):
                assert_stream_matches(text, deltas, tools, thinking)


@PROPERTY_SETTINGS
@given(text_and_cuts(chat_text()))
def test_any_split_joins_to_one_shot(case: tuple[str, list[int]]) -> None:
    check_all_modes(*case)


@PROPERTY_SETTINGS
@given(text_and_cuts(st.lists(TAG_SOUP, max_size=25).map("".join)))
def test_tag_fragment_soup_joins_to_one_shot(case: tuple[str, list[int]]) -> None:
    check_all_modes(*case)


PLAIN_TEXT = st.text(st.characters(blacklist_characters="<", blacklist_categories=["Cs"]), max_size=20)


@settings(PROPERTY_SETTINGS, max_examples=60)
@given(
    s=PLAIN_TEXT,
    i=st.integers(-(10**12), 10**12),
    b=st.booleans(),
    a=st.lists(st.one_of(st.integers(), PLAIN_TEXT, st.booleans(), st.none()), max_size=4),
    x=PLAIN_TEXT,
    cuts=st.lists(st.integers(0, 400), max_size=10),
)
def test_rendered_calls_round_trip(s: str, i: int, b: bool, a: list, x: str, cuts: list[int]) -> None:
    # the chat template writes strings raw, numbers with str() and lists as JSON; the parser must read them back
    text = call("f", ("s", s), ("i", str(i)), ("b", str(b)), ("a", json.dumps(a, ensure_ascii=False)))
    text += "\n" + call("g", ("x", x))
    content, calls = parse_tool_calls(text, TOOLS)
    assert content is None
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        ("f", {"s": s, "i": i, "b": b, "a": a}),
        ("g", {"x": x}),
    ]
    assert calls[0]["arguments"] == json.dumps({"s": s, "i": i, "b": b, "a": a}, ensure_ascii=False)
    assert_stream_matches(text, split_at(text, [c for c in cuts if c <= len(text)]), TOOLS, thinking=True)

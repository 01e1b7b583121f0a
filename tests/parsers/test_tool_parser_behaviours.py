"""The qwen3_coder behaviours that vLLM's own tests pin down (spec §9.5), non-streaming and streamed.

Streamed variants replay vLLM's delta lists where the test had one, and always character by character and token by
token; every replay must join to the non-streaming result (checked by `assert_stream_matches`).
"""

from __future__ import annotations

import json
import time

import pytest
from parser_cases import assert_stream_matches, call, run_stream, tool

from fp4serve.parsers import ChatStreamParser, parse_chat_output, parse_tool_calls

WEATHER = tool(
    "get_current_weather",
    {"city": {"type": "string"}, "state": {"type": "string"}, "unit": {"type": "string", "enum": ["f", "c"]}},
)
AREA = tool(
    "calculate_area", {"shape": {"type": "string"}, "dimensions": {"type": "object"}, "precision": {"type": "integer"}}
)
SAMPLE = [WEATHER, AREA]
WRITE_FILE = [tool("write_file", {"path": {"type": "string"}, "content": {"type": "string"}})]
DALLAS = (
    "<tool_call>\n<function=get_current_weather>\n<parameter=city>\nDallas\n</parameter>\n"
    "<parameter=state>\nTX\n</parameter>\n<parameter=unit>\nfahrenheit\n</parameter>\n</function>\n</tool_call>"
)
DALLAS_ARGS = {"city": "Dallas", "state": "TX", "unit": "fahrenheit"}


def parse_everywhere(text, tools, token_split, deltas=None):
    """Non-streaming result, after checking that every replay of the stream joins to it."""
    replays = [list(text), token_split(text), [text]] + ([deltas] if deltas else [])
    for replay in replays:
        assert_stream_matches(text, replay, tools, thinking=False)
    out = parse_chat_output(text, tools, thinking=False)
    calls = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in out.tool_calls]
    return out.content, calls


def test_no_tool_calls_keeps_text(token_split):
    text = "This is a test response without any tool calls"
    assert parse_tool_calls(text, SAMPLE) == (text, [])
    assert parse_tool_calls(text, None) == (text, [])
    assert parse_everywhere(text, SAMPLE, token_split) == (text, [])


@pytest.mark.parametrize(
    ("text", "calls", "content"),
    [
        (DALLAS, [("get_current_weather", DALLAS_ARGS)], None),
        (
            "Sure! Let me check the weather for you." + DALLAS,
            [("get_current_weather", DALLAS_ARGS)],
            "Sure! Let me check the weather for you.",
        ),
        (
            "<tool_call>\n<function=calculate_area>\n<parameter=shape>\nrectangle\n</parameter>\n<parameter=dimensions>\n"
            '{"width": 10, \n "height": 20}\n</parameter>\n<parameter=precision>\n2\n</parameter>\n'
            "</function>\n</tool_call>",
            [("calculate_area", {"shape": "rectangle", "dimensions": {"width": 10, "height": 20}, "precision": 2})],
            None,
        ),
        (
            DALLAS + "\n" + DALLAS.replace("Dallas", "Orlando").replace("TX", "FL"),
            [
                ("get_current_weather", DALLAS_ARGS),
                ("get_current_weather", {**DALLAS_ARGS, "city": "Orlando", "state": "FL"}),
            ],
            None,
        ),
        (
            "Let me calculate that area for you.<tool_call>\n<function=calculate_area>\n<parameter=shape>\ncircle\n"
            '</parameter>\n<parameter=dimensions>\n{"radius": 15.5}\n</parameter>\n'
            "<parameter=precision>\n3\n</parameter>\n"
            "</function>\n</tool_call>",
            [("calculate_area", {"shape": "circle", "dimensions": {"radius": 15.5}, "precision": 3})],
            "Let me calculate that area for you.",
        ),
    ],
    ids=[
        "single_tool",
        "single_tool_with_content",
        "single_tool_multiline_param",
        "parallel_tools",
        "tool_with_typed_params",
    ],
)
def test_extract_tool_calls(text, calls, content, token_split):
    assert parse_everywhere(text, SAMPLE, token_split) == (content, calls)


def test_fallback_without_tool_call_tags(token_split):
    text = (
        DALLAS.removeprefix("<tool_call>\n")
        .removesuffix("\n</tool_call>")
        .replace("<parameter=unit>\nfahrenheit\n</parameter>\n", "")
    )
    content, calls = parse_everywhere(text, SAMPLE, token_split)
    assert calls == [("get_current_weather", {"city": "Dallas", "state": "TX"})] and content is None


def test_missing_opening_tag_with_closing_tag(token_split):
    text = "I'll check the weather for you.\n\n" + DALLAS.removeprefix("<tool_call>\n")
    content, calls = parse_everywhere(text, SAMPLE, token_split)
    assert content == "I'll check the weather for you.\n\n"
    assert calls == [("get_current_weather", DALLAS_ARGS)]


def test_missing_closing_parameter_tag(token_split):
    text = "Let me check the weather for you:\n" + DALLAS.replace("Dallas\n</parameter>\n", "Dallas\n")
    content, calls = parse_everywhere(text, SAMPLE, token_split)
    assert calls == [("get_current_weather", DALLAS_ARGS)]
    assert content == "Let me check the weather for you:\n"


def test_streaming_is_incremental(token_split):
    text = "I'll check the weather." + DALLAS
    fragments = run_stream(token_split(text), SAMPLE, thinking=False)
    assert fragments[0].get("content")
    header = next(f["tool_calls"][0] for f in fragments if "tool_calls" in f)
    assert header["function"]["name"] == "get_current_weather" and header["type"] == "function"
    pieces = [f["tool_calls"][0]["function"]["arguments"] for f in fragments if "tool_calls" in f]
    assert len([p for p in pieces if p]) > 3
    assert json.loads("".join(pieces)) == DALLAS_ARGS


def test_type_conversion(token_split):
    tools = [
        tool(
            "test_types",
            {
                "int_param": {"type": "integer"},
                "float_param": {"type": "float"},
                "bool_param": {"type": "boolean"},
                "str_param": {"type": "string"},
                "obj_param": {"type": "object"},
            },
        )
    ]
    text = (
        "<tool_call>\n<function=test_types>\n<parameter=int_param>\n42\n</parameter>\n<parameter=float_param>\n3.14\n"
        "</parameter>\n<parameter=bool_param>\ntrue\n</parameter>\n<parameter=str_param>\nhello world\n</parameter>\n"
        '<parameter=obj_param>\n{"key": "value"}\n</parameter>\n</function>\n</tool_call>'
    )
    _, [(_, args)] = parse_everywhere(text, tools, token_split)
    assert args == {
        "int_param": 42,
        "float_param": 3.14,
        "bool_param": True,
        "str_param": "hello world",
        "obj_param": {"key": "value"},
    }
    single_quote = text.replace('{"key": "value"}', "{'key': 'value'}")
    assert parse_everywhere(single_quote, tools, token_split)[1][0][1]["obj_param"] == {"key": "value"}


def test_anyof_type_conversion(token_split):
    props = {
        "anyof_int": {"anyOf": [{"type": "integer"}, {"type": "null"}], "default": 5},
        "anyof_str": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "anyof_array": {"anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "null"}]},
        "anyof_obj": {"anyOf": [{"type": "object"}, {"type": "null"}]},
        "type_as_array": {"type": ["integer", "null"]},
        "multi_non_null": {"anyOf": [{"type": "string"}, {"type": "integer"}, {"type": "null"}]},
    }
    values = {
        "anyof_int": "5",
        "anyof_str": "hello",
        "anyof_array": '["a", "b", "c"]',
        "anyof_obj": '{"key": "value"}',
        "type_as_array": "42",
        "multi_non_null": "some text",
    }
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in values.items())
    text = f"<tool_call>\n<function=test_anyof>\n{body}</function>\n</tool_call>"
    _, [(_, args)] = parse_everywhere(text, [tool("test_anyof", props)], token_split)
    assert args == {
        "anyof_int": 5,
        "anyof_str": "hello",
        "anyof_array": ["a", "b", "c"],
        "anyof_obj": {"key": "value"},
        "type_as_array": 42,
        "multi_non_null": "some text",
    }


def test_malformed_function_name_is_not_a_call(token_split):
    text = "<tool_call>\n<function=get_current_weather\n<parameter=city>Dallas</parameter>\n</function>\n</tool_call>"
    assert parse_everywhere(text, SAMPLE, token_split) == (text, [])


def test_bad_call_dropped_good_call_kept(token_split):
    bad = "<tool_call>\n<function=bad_func_no_gt\n</function>\n</tool_call>\n"
    good = (
        "<tool_call>\n<function=get_current_weather>\n<parameter=city>Dallas</parameter>\n"
        "<parameter=state>TX</parameter>\n</function>\n</tool_call>"
    )
    content, calls = parse_everywhere(bad + good, SAMPLE, token_split)
    assert calls == [("get_current_weather", {"city": "Dallas", "state": "TX"})]
    assert content == bad  # the malformed call's text stays content (§12b)


def test_jinja_phantom_call_is_rejected(token_split):
    phantom = (
        "<tool_call>\n<function={{ tc.name }}>\n<parameter={{ k }}>\n{{ v }}\n</parameter>\n</function>\n</tool_call>"
    )
    real = call("write_file", ("path", "out.txt"), ("content", "hello"))
    content, calls = parse_everywhere(phantom + "\n\n" + real, WRITE_FILE, token_split)
    assert calls == [("write_file", {"path": "out.txt", "content": "hello"})]
    assert content == phantom + "\n\n"


def test_anyof_object_not_double_encoded(token_split):
    tools = [tool("update_record", {"data": {"anyOf": [{"type": "object"}, {"type": "null"}]}})]
    deltas = [
        "<tool_call>",
        "\n<function=update_record>",
        '\n<parameter=data>{"key": "value", "count": 42}</parameter>',
        "\n</function>",
        "\n</tool_call>",
    ]
    text = "".join(deltas)
    assert parse_everywhere(text, tools, token_split, deltas)[1] == [
        ("update_record", {"data": {"key": "value", "count": 42}})
    ]


def test_multi_param_single_chunk_and_speculative_loss(token_split):
    deltas = [
        "<tool_call>",
        "\n<function=get_current_weather>",
        "\n",
        "<parameter=city>\nDallas\n</parameter>\n<parameter=state>\nTX\n</parameter>\n<parameter=unit>\nfahrenheit\n</parameter>",
        "\n</function>",
        "\n</tool_call>",
    ]
    assert parse_everywhere("".join(deltas), SAMPLE, token_split, deltas)[1] == [("get_current_weather", DALLAS_ARGS)]
    # the delta that carries the parameters and the end of the call must not lose the parameters
    parser = ChatStreamParser([tool("test", {"city": {"type": "string"}})], thinking=False)
    parser.feed("<tool_call>\n<function=test>\n")
    second = parser.feed("<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>")
    assert "".join(f["tool_calls"][0]["function"]["arguments"] for f in second) == '"city": "Paris"}'


def test_string_arguments_not_double_serialized(token_split):
    tools = [tool("greet", {"message": {"type": "string"}})]
    text = "<tool_call>\n<function=greet>\n<parameter=message>hello world</parameter>\n</function>\n</tool_call>"
    _, calls = parse_tool_calls(text, tools)
    assert calls == [{"name": "greet", "arguments": '{"message": "hello world"}'}]
    parse_everywhere(text, tools, token_split)


@pytest.mark.parametrize(
    ("schema", "raw", "expected"),
    [
        ({"type": "string"}, "null", "null"),  # string "null" stays a string (main, §12b)
        ({"anyOf": [{"type": "string"}, {"type": "null"}]}, "42", "42"),
        ({"anyOf": [{"type": "integer"}, {"type": "null"}]}, "42", 42),
        ({"anyOf": [{"type": "integer"}, {"type": "null"}]}, "None", None),
        ({"anyOf": [{"type": "string"}, {"type": "null"}]}, "null", None),
        ({"anyOf": [{"type": "string"}, {"type": "null"}]}, "None", None),
        ({"type": "array"}, '["a", "b", 1, true]', ["a", "b", 1, True]),
        ({"type": "object"}, "\"{'key': 'value', 'n': 1}\"", {"key": "value", "n": 1}),
    ],
)
def test_null_and_container_values(schema, raw, expected, token_split):
    text = f"<tool_call>\n<function=h>\n<parameter=p>\n{raw}\n</parameter>\n</function>\n</tool_call>"
    assert parse_everywhere(text, [tool("h", {"p": schema})], token_split)[1] == [("h", {"p": expected})]


XML_TAGS_IN_CONTENT = (
    'char_deltas = [\n    "<tool_call>\\n",\n    "<parameter=query>\\n",\n'
    '    "\\n</parameter>\\n",\n    "</function>\\n",\n]\n'
)
PARAM_LIKE_LINES = (
    'TOOL_CALL_TEMPLATE = """\n</parameter>\n<parameter=new_string>\n#!/usr/bin/env python3\n</parameter>\n"""\n'
)
REAL_PARAM_NAME_LITERAL = 'doc = """\n<parameter=path>\nliteral/value\n</parameter>\n"""\n'
FULL_NESTED_CALL = (
    'doc = """\n<tool_call>\n<function=write_file>\n<parameter=path>\nliteral/value.txt\n</parameter>\n'
    '<parameter=content>\nhello\n</parameter>\n</function>\n</tool_call>\n"""\n'
)


@pytest.mark.parametrize(
    "literal",
    [XML_TAGS_IN_CONTENT, PARAM_LIKE_LINES, REAL_PARAM_NAME_LITERAL, FULL_NESTED_CALL],
    ids=["xml_structural_tags", "param_like_lines", "real_param_name_literal", "full_nested_tool_call"],
)
def test_literal_xml_inside_a_string_value(literal, token_split):
    text = (
        f"<tool_call>\n<function=write_file>\n<parameter=path>\nfixture.py\n</parameter>\n"
        f"<parameter=content>\n{literal}</parameter>\n</function>\n</tool_call>\n"
    )
    lines = [line + "\n" for line in text.split("\n")[:-1]]
    content, calls = parse_everywhere(text, WRITE_FILE, token_split, lines)
    assert calls == [("write_file", {"path": "fixture.py", "content": literal.rstrip("\n")})]
    assert content is None
    assert list(calls[0][1]) == ["path", "content"]


def test_two_tools_second_with_out_of_schema_nested_literal(token_split):
    nested = (
        'template = """\n<tool_call>\n<function=foo>\n<parameter=bar>baz</parameter>\n</function>\n</tool_call>\n"""\n'
    )
    text = (
        "<tool_call>\n<function=foo>\n<parameter=bar>baz</parameter>\n</function>\n</tool_call>\n\n"
        "<tool_call>\n<function=write_file>\n<parameter=path>\nfixture.py\n</parameter>\n"
        f"<parameter=content>\n{nested}</parameter>\n</function>\n</tool_call>"
    )
    _, calls = parse_everywhere(text, WRITE_FILE, token_split)
    assert calls == [("foo", {"bar": "baz"}), ("write_file", {"path": "fixture.py", "content": nested.rstrip("\n")})]


WEATHER_CALL = (
    "<tool_call>\n<function=get_current_weather>\n<parameter=city>\n{}\n</parameter>\n</function>\n</tool_call>"
)


def test_two_calls_and_trailing_text_in_one_delta(token_split):
    text = WEATHER_CALL.format("Paris") + "\n" + WEATHER_CALL.format("London") + "\nAll done!"
    content, calls = parse_everywhere(text, SAMPLE, token_split)
    assert calls == [("get_current_weather", {"city": "Paris"}), ("get_current_weather", {"city": "London"})]
    assert content == "\nAll done!"


def test_trailing_text_with_final_close_in_same_delta(token_split):
    deltas = [
        "<tool_call>\n<function=get_current_weather>\n<parameter=city>Paris</parameter>\n</function>",
        "\n</tool_call>\nI hope this helps!",
    ]
    content, calls = parse_everywhere("".join(deltas), SAMPLE, token_split, deltas)
    assert calls == [("get_current_weather", {"city": "Paris"})] and content == "\nI hope this helps!"


def test_inline_empty_tool_call_keeps_surrounding_content(token_split):
    text = (
        "I'll show: <tool_call>example</tool_call>. Now real:\n"
        "<tool_call>\n<function=log>\n<parameter=msg>\nhi\n</parameter>\n</function>\n</tool_call>"
    )
    content, calls = parse_everywhere(text, [tool("log", {"msg": {"type": "string"}})], token_split)
    assert calls == [("log", {"msg": "hi"})]
    assert content == "I'll show: <tool_call>example</tool_call>. Now real:\n"


def test_unknown_function_and_unknown_parameter_are_raw_strings(token_split):
    text = call("f", ("s", "Paris"), ("zz", "5"))
    assert parse_everywhere(text, SAMPLE + [tool("f", {"s": {"type": "string"}})], token_split)[1] == [
        ("f", {"s": "Paris", "zz": "5"})
    ]
    assert parse_everywhere(text.replace("=f>", "=nope>"), SAMPLE, token_split)[1] == [
        ("nope", {"s": "Paris", "zz": "5"})
    ]


@pytest.mark.parametrize(
    ("text", "args"),
    [
        ("<tool_call>\n<function=get_current_weather>\n<parameter=city>\nPar", {"city": "Par"}),
        ("<tool_call>\n<function=get_current_weather>\n<parameter=city>\nParis\n</para", {"city": "Paris"}),
        (
            "<tool_call>\n<function=get_current_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=sta",
            {"city": "Paris"},
        ),
        ("<tool_call>\n<function=get_current_weather>\n", {}),
        (
            "<tool_call>\n<function=get_current_weather>\n<parameter=city>\nParis\n</function>\n</tool_call>",
            {"city": "Paris"},
        ),
        (
            "<tool_call>\n<function=get_current_weather>\n<parameter=city>\nParis\n</parameter>\n</tool_call>",
            {"city": "Paris"},
        ),
    ],
    ids=["mid_value", "mid_close_tag", "mid_next_name", "header_only", "no_param_close", "no_function_close"],
)
def test_truncated_or_unclosed_call_gives_complete_json(text, args, token_split):
    content, calls = parse_everywhere(text, SAMPLE, token_split)
    assert calls == [("get_current_weather", args)] and content is None


def test_non_call_tool_call_tag_stays_content(token_split):
    for text in (
        "<tool_call>",
        "a <tool_call>\n",
        "<tool_call>\n<function",
        "x <function=> y",
        "<tool_call>hi</tool_call>",
    ):
        assert parse_everywhere(text, SAMPLE, token_split) == (text, [])


def test_whitespace_only_content_around_calls_is_dropped(token_split):
    text = "\n\n" + WEATHER_CALL.format("Paris") + "\n  \n"
    assert parse_everywhere(text, SAMPLE, token_split)[0] is None
    assert parse_tool_calls("  \n", SAMPLE) == ("  \n", [])


def test_repeated_parameter_keeps_first_value(token_split):
    text = call("g", ("x", "A"), ("x", "B"))
    assert parse_everywhere(text, [tool("g", {"x": {"type": "string"}})], token_split)[1] == [("g", {"x": "A"})]


def test_long_streamed_argument_is_linear_time():
    # rule A resumes where it stopped: a 100 KB file argument in 8-character deltas must not rescan the value
    body = "".join(f"line {i}: a<b and <tag> text\n" for i in range(3500))
    text = call("write_file", ("path", "a.py"), ("content", body))
    parser = ChatStreamParser(WRITE_FILE, thinking=False)
    started = time.perf_counter()
    fragments = [f for k in range(0, len(text), 8) for f in parser.feed(text[k : k + 8])] + parser.finish()
    assert time.perf_counter() - started < 4.0
    arguments = "".join(f["tool_calls"][0]["function"]["arguments"] for f in fragments if "tool_calls" in f)
    assert json.loads(arguments) == {"path": "a.py", "content": body}

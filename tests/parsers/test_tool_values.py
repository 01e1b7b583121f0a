"""Parameter value conversion (spec §9.2, newest-main rules) and schema lookup."""

from __future__ import annotations

import json

import pytest

from fp4serve.parsers.values import convert_value, declared_type, tool_properties


def conv(schema, raw):
    value = convert_value(raw, {"p": schema}, "p")
    json.dumps(value, allow_nan=False)  # always strict JSON
    return value


@pytest.mark.parametrize(
    ("schema", "raw", "expected"),
    [
        ({"type": "string"}, "  spaced  ", "  spaced  "),
        ({"type": "string"}, "null", "null"),
        ({"type": "string"}, "None", "None"),
        ({"type": "STRING"}, "42", "42"),
        ({"type": "string", "enum": ["a"]}, "a", "a"),
        ({"type": "enum"}, "7", "7"),
        ({"type": "integer"}, "null", None),
        ({"type": "integer"}, "NULL", None),
        ({"type": "integer"}, "None", None),
        ({"type": "integer"}, " 8 ", 8),
        ({"type": "int64"}, "-3", -3),
        ({"type": "uint8"}, "3", 3),
        ({"type": "integer"}, "1" * 5000, "1" * 5000),
        ({"type": "number"}, "nan", "nan"),
        ({"type": "number"}, "inf", "inf"),
        ({"type": "number"}, "-0.5", -0.5),
        ({"type": "float"}, "2.50", 2.5),
        ({"type": "boolean"}, "TRUE", True),
        ({"type": "bool"}, "1", False),
        ({"type": "object"}, "{1, 2}", "{1, 2}"),
        ({"type": "object"}, "[NaN]", "[NaN]"),
        ({"type": "object"}, "{'a': (1, 2)}", {"a": [1, 2]}),
        ({"type": "object"}, "not json", "not json"),
        ({"type": "array"}, "[1, 2", "[1, 2"),
        ({"type": "dict"}, '{"k": null}', {"k": None}),
        ({"type": "list[str]"}, "['x']", ["x"]),
        ({"type": "object"}, "'{\"k\": 1}'", {"k": 1}),
        ({"type": ["integer", "null"]}, "42", 42),
        ({"type": ["integer", "null"]}, "4.0", 4.0),
        ({"type": ["integer", "null"]}, "null", None),
        ({"type": ["integer", "null"]}, "abc", "abc"),
        ({"type": "null"}, "None", None),
        ({"type": "any"}, "hello world", "hello world"),
        ({"type": "any"}, "[1, 'a']", [1, "a"]),
        ({"type": "any"}, "1e999", "1e999"),
        ({"anyOf": [{"type": "null"}, {"type": "number"}]}, "1.5", 1.5),
        ({"anyOf": [{"type": "object"}, {"type": "null"}]}, "{'k': None}", {"k": None}),
        ({"anyOf": [{"$ref": "#/x"}]}, "5", "5"),
        ({"description": "no type"}, "5", "5"),
        ("not a dict", "5", "5"),
    ],
)
def test_convert_value(schema, raw, expected):
    assert conv(schema, raw) == expected
    assert type(conv(schema, raw)) is type(expected)


def test_unknown_parameter_or_tool_gives_raw_string():
    assert convert_value("5", {"q": {"type": "integer"}}, "p") == "5"
    assert convert_value("5", None, "p") == "5"


def test_declared_type():
    assert declared_type({"type": ["integer", "null"]}) == ("['integer', 'null']", False)
    assert declared_type({"anyOf": [{"type": "null"}, {"type": "Integer"}]}) == ("integer", True)
    assert declared_type({"anyOf": [{"type": "null"}]}) == ("string", True)


def test_tool_properties():
    tools = [
        {"type": "function", "function": {"name": "a", "parameters": {"type": "object", "properties": {"x": {}}}}},
        {"type": "function", "function": {"name": "b", "parameters": {"x": {"type": "integer"}}}},
        {"type": "function", "function": {"name": "c"}},
        {"type": "function", "function": {"name": "d", "parameters": {"properties": "bad"}}},
        {"type": "function", "function": {"name": "e", "parameters": {"type": "object"}}},
        {"type": "function", "function": {"name": "a", "parameters": {"properties": {"y": {}}}}},
        {"type": "function"},
        "junk",
    ]
    assert tool_properties(tools) == {"a": {"x": {}}, "b": {"x": {"type": "integer"}}, "c": None, "d": None, "e": None}
    assert tool_properties(None) == {}

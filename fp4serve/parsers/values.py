"""Convert a raw `<parameter=…>` text into a JSON value using the tool's JSON schema (spec §9.2, newest-main rules).

The model writes every argument as plain text; the request's tool schema says what it should become. The rules are
vLLM main's: the declared type is `type` lower-cased (a list such as `["integer", "null"]` keeps its `str()` form and
so takes the generic branch), or for `anyOf` the first non-null option; `"null"`/`"None"` become null for non-string
types and for nullable schemas, while a plain string parameter keeps the text "null". A value that does not fit its
type stays the raw string. Every result is checked to be strict JSON (no NaN, no sets), so callers can always
`json.dumps` it; anything else falls back to the raw string.
"""

from __future__ import annotations

import ast
import json
import math
from typing import Any

STRING_TYPES = frozenset({"string", "str", "text", "varchar", "char", "enum"})
BOOL_TYPES = frozenset({"boolean", "bool", "binary"})
INT_PREFIXES = ("int", "uint", "long", "short", "unsigned")
FLOAT_PREFIXES = ("num", "float")
NULL_WORDS = frozenset({"null", "none"})
# errors that a hostile or odd literal can raise inside json.loads / ast.literal_eval / int() / float()
PARSE_ERRORS = (ValueError, TypeError, SyntaxError, MemoryError, RecursionError, OverflowError)


def tool_properties(tools: list[dict[str, Any]] | None) -> dict[str, dict[str, Any] | None]:
    """Map each tool name to its parameter schemas (`parameters.properties`, or a bare `{name: schema}` mapping).

    A tool without any usable schema (none, or an object schema without `properties`) maps to None, which means
    "any parameter name, raw string values".
    Entries that are not OpenAI function tools are skipped: the request layer validates tools, the parser must
    not fail on them.
    """
    table: dict[str, dict[str, Any] | None] = {}
    for tool in tools or []:
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            continue
        parameters = function.get("parameters")
        properties: dict[str, Any] | None = None
        if isinstance(parameters, dict) and "properties" in parameters:
            properties = parameters["properties"] if isinstance(parameters["properties"], dict) else None
        elif isinstance(parameters, dict) and not isinstance(parameters.get("type"), str):
            # vLLM also accepts a bare {name: schema} mapping as the parameters
            properties = parameters
        table.setdefault(function["name"], properties)
    return table


def declared_type(schema: Any) -> tuple[str, bool]:
    """Return (type name, null allowed) for one parameter schema."""
    if not isinstance(schema, dict):
        return "string", False
    if "type" in schema:
        name = str(schema["type"]).strip().lower()
        return name, name == "null"
    options = schema.get("anyOf")
    if isinstance(options, list):
        picked, allows_null = None, False
        for option in options:
            if not isinstance(option, dict) or "type" not in option:
                continue
            name = str(option["type"]).strip().lower()
            if name == "null":
                allows_null = True
            elif picked is None:
                picked = name
        return picked or "string", allows_null
    return "string", False


def convert_value(raw: str, properties: dict[str, Any] | None, name: str) -> Any:
    """Convert `raw` (already stripped of one leading and one trailing newline) for parameter `name`."""
    if properties is None or name not in properties:
        return raw
    type_name, allows_null = declared_type(properties[name])
    if allows_null and raw.lower() in NULL_WORDS:
        return None
    if type_name in STRING_TYPES:
        return raw
    if raw.lower() in NULL_WORDS:
        return None
    if type_name.startswith(INT_PREFIXES):
        try:
            return int(raw)
        except PARSE_ERRORS:
            return raw
    if type_name.startswith(FLOAT_PREFIXES):
        return _to_number(raw)
    if type_name in BOOL_TYPES:
        return raw.lower() == "true"
    container = type_name in ("object", "array", "arr") or type_name.startswith(("dict", "list"))
    return _strict_json_or(_to_literal(raw, container), raw)


def _to_number(raw: str) -> Any:
    try:
        number = float(raw)
    except PARSE_ERRORS:
        return raw
    if not math.isfinite(number):
        return raw
    return int(number) if number.is_integer() else number


def _to_literal(raw: str, container: bool) -> Any:
    if container:
        try:
            parsed = json.loads(raw)
        except PARSE_ERRORS:
            pass
        else:
            # a model trained on json.dumps(str(dict)) writes a JSON string holding a Python repr: decode twice
            return _literal_or(parsed, parsed) if isinstance(parsed, str) else parsed
    value = _literal_or(raw, raw)
    if container and isinstance(value, str) and value is not raw:
        value = _literal_or(value, value)
    return value


def _literal_or(text: str, fallback: Any) -> Any:
    try:
        return ast.literal_eval(text)
    except PARSE_ERRORS:
        return fallback


def _strict_json_or(value: Any, raw: str) -> Any:
    """`value` as plain JSON data (tuples become lists, keys strings), or `raw` if it is not strict JSON."""
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False)
    except PARSE_ERRORS:
        return raw
    return json.loads(text) if isinstance(value, (list, tuple, dict)) else value

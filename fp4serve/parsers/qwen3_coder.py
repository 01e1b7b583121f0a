"""qwen3_coder tool parser: Qwen's `<tool_call><function=NAME><parameter=K>V</parameter></function></tool_call>` XML
to OpenAI tool calls (spec §9 with the §12b decisions).

One incremental scanner serves both modes: `parse_tool_calls` feeds the whole text and finishes, a stream feeds
deltas. The scanner only decides when the text it holds settles the question for every possible continuation, and
otherwise waits, so the joined stream equals the one-shot result for every split of the text. Decisions:
- A call starts at `<tool_call>` + whitespace + `<function=NAME>`, or at a bare `<function=NAME>`. NAME must be
  non-empty, at most 256 characters, without whitespace or `{}<>"'`; otherwise the tag is ordinary content.
- A parameter value ends at its `</parameter>`, told apart from literal tags inside the value (code, templates,
  parser fixtures) in this order: (A) the first `</parameter>` outside nested `<tool_call>…</tool_call>` and
  `<parameter=K>…</parameter>` pairs whose next tag is `<parameter=`, `</function>`, `</tool_call>` or the end;
  (B) the same without skipping nested calls; (C) a missing `</parameter>`: the next `<parameter=K>` for a schema
  name not seen yet; (D) `</function>`, `</tool_call>` or the end of the text. A following `<parameter=K>` whose K
  is not in the schema only counts as structural if the rest of the call has balanced parameter tags.
- One leading and one trailing newline of a value are dropped; values are converted with `values.convert_value`.
  A repeated parameter keeps its first value (a stream cannot take back what it sent).
- `arguments` is `json.dumps(args, ensure_ascii=False)`. Streamed, it goes out as `{`, then `"k": v` / `, "k": v`
  as each parameter closes, then `}`, so a truncated call still joins to complete JSON.
- Content is the text outside calls: a stretch before, between or after calls is kept exactly when it holds
  non-whitespace and dropped when it is only whitespace; without any call the content is the text unchanged.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from fp4serve.parsers.values import convert_value, tool_properties

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
FUNCTION_PREFIX = "<function="
FUNCTION_CLOSE = "</function>"
PARAM_PREFIX = "<parameter="
PARAM_CLOSE = "</parameter>"
MAX_NAME_LEN = 256

CALL_START = re.compile(r"<tool_call>|<function=")
FUNCTION_NAME = re.compile(r"[^\s{}<>\"']*")
PARAM_OPEN = re.compile(r"<parameter=([^<>\n]*)>")
VALUE_TAGS = re.compile(r"<parameter=([^<>\n]*)>|</parameter>|<tool_call>|</tool_call>")
CALL_TAGS = re.compile(r"<parameter=|</function>|</tool_call>")
WHITESPACE = re.compile(r"\s*")
CLOSING_TAGS = (PARAM_CLOSE, FUNCTION_CLOSE, TOOL_CALL_CLOSE)


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def _proper_prefix_of(tail: str, tags: tuple[str, ...]) -> bool:
    return any(len(tail) < len(tag) and tag.startswith(tail) for tag in tags)


@dataclass
class _Call:
    index: int
    name: str
    properties: dict[str, Any] | None
    seen: set[str] = field(default_factory=set)

    def knows(self, param: str) -> bool:
        return self.properties is None or param in self.properties


class ToolCallStream:
    """Incremental qwen3_coder parser over content text; `feed`/`finish` return OpenAI delta fragments."""

    def __init__(self, tools: list[dict[str, Any]] | None) -> None:
        self._schemas = tool_properties(tools)
        self._buf = ""
        self._state = "content"
        self._call: _Call | None = None
        # where rule A stopped in the pending value: (value start, position, depth, nested calls)
        self._scan_state: tuple[int, int, int, int] | None = None
        self._num_calls = 0
        self._out: list[dict[str, Any]] = []
        # content bookkeeping: does the current outside-call stretch hold non-whitespace yet
        self._stretch_has_text = False
        self._pending_space = ""

    @property
    def num_calls(self) -> int:
        return self._num_calls

    def feed(self, delta: str) -> list[dict[str, Any]]:
        self._buf += delta
        self._run(final=False)
        return self._take()

    def finish(self) -> list[dict[str, Any]]:
        self._run(final=True)
        if self._state == "call":
            self._close_call()
        self._state, self._call = "content", None
        if self._num_calls == 0 and self._pending_space:
            self._emit_content(self._pending_space, force=True)
        self._pending_space = ""
        return self._take()

    def _take(self) -> list[dict[str, Any]]:
        out, self._out = self._out, []
        return out

    def _run(self, final: bool) -> None:
        step = {"content": self._step_content, "call": self._step_call, "after_function": self._step_after_function}
        while self._buf and step[self._state](final):
            pass

    def _step_content(self, final: bool) -> bool:
        buf = self._buf
        match = CALL_START.search(buf)
        if match is None:
            lt = buf.rfind("<")
            partial = not final and lt >= 0 and _proper_prefix_of(buf[lt:], (TOOL_CALL_OPEN, FUNCTION_PREFIX))
            keep = len(buf) - lt if partial else 0
            self._emit_content(buf[: len(buf) - keep])
            self._buf = buf[len(buf) - keep :]
            return False
        self._emit_content(buf[: match.start()])
        self._buf = buf = buf[match.start() :]
        opened = self._open_call(final)
        if opened is None:
            return False
        if opened == 0:
            literal = len(TOOL_CALL_OPEN) if buf.startswith(TOOL_CALL_OPEN) else len(FUNCTION_PREFIX)
            self._emit_content(buf[:literal])
            self._buf = buf[literal:]
        return True

    def _open_call(self, final: bool) -> int | None:
        """At a call-start tag: start the call (return chars consumed), 0 if it is literal text, None to wait."""
        buf = self._buf
        fn = 0
        if buf.startswith(TOOL_CALL_OPEN):
            fn = WHITESPACE.match(buf, len(TOOL_CALL_OPEN)).end()
            if not buf.startswith(FUNCTION_PREFIX, fn):
                return None if not final and FUNCTION_PREFIX.startswith(buf[fn:]) else 0
        name_start = fn + len(FUNCTION_PREFIX)
        name_end = FUNCTION_NAME.match(buf, name_start).end()
        too_long = name_end - name_start > MAX_NAME_LEN
        if name_end == len(buf) and not final and not too_long:
            return None
        if name_end == len(buf) or buf[name_end] != ">" or name_end == name_start or too_long:
            return 0
        self._start_call(buf[name_start:name_end])
        self._buf = buf[name_end + 1 :]
        return name_end + 1

    def _start_call(self, name: str) -> None:
        if not self._stretch_has_text:
            self._pending_space = ""
        self._stretch_has_text = False
        self._scan_state = None
        self._call = _Call(self._num_calls, name, self._schemas.get(name))
        self._num_calls += 1
        function = {"name": name, "arguments": ""}
        header = {"index": self._call.index, "id": new_call_id(), "type": "function", "function": function}
        self._out.append({"tool_calls": [header]})
        self._emit_arguments("{")
        self._state = "call"

    def _close_call(self) -> None:
        self._emit_arguments("}")
        self._call = None
        self._state = "content"

    def _step_call(self, final: bool) -> bool:
        buf = self._buf = self._buf[WHITESPACE.match(self._buf).end() :]
        if not buf:
            return False
        if buf.startswith(PARAM_PREFIX):
            return self._step_param(final)
        if buf.startswith(FUNCTION_CLOSE):
            self._buf = buf[len(FUNCTION_CLOSE) :]
            self._emit_arguments("}")
            self._state = "after_function"
            return True
        if buf.startswith(TOOL_CALL_CLOSE):
            self._buf = buf[len(TOOL_CALL_CLOSE) :]
            self._close_call()
            return True
        if not final and _proper_prefix_of(buf, (PARAM_PREFIX, FUNCTION_CLOSE, TOOL_CALL_CLOSE)):
            return False
        # stray text between parameters is skipped up to the next tag
        match = CALL_TAGS.search(buf, 1)
        if match is None:
            if final:
                self._buf = ""
            return False
        self._buf = buf[match.start() :]
        return True

    def _step_param(self, final: bool) -> bool:
        buf = self._buf
        match = PARAM_OPEN.match(buf)
        if match is None:
            # no complete `<parameter=NAME>`: wait while the name may still close, else skip the tag as stray text
            if not final and not any(ch in buf[len(PARAM_PREFIX) :] for ch in "<>\n"):
                return False
            nxt = CALL_TAGS.search(buf, 1)
            if nxt is None and not final:
                return False
            self._buf = "" if nxt is None else buf[nxt.start() :]
            return True
        call = self._call
        assert call is not None
        name, start = match.group(1), match.end()
        found = self._value_end(buf, start, name, final)
        if found is None:
            return False
        end, resume = found
        raw = buf[start:end]
        raw = raw[1:] if raw.startswith("\n") else raw
        raw = raw[:-1] if raw.endswith("\n") else raw
        if name not in call.seen:
            value = convert_value(raw, call.properties, name)
            piece = f"{json.dumps(name, ensure_ascii=False)}: {json.dumps(value, ensure_ascii=False)}"
            self._emit_arguments(piece if not call.seen else ", " + piece)
            call.seen.add(name)
        self._buf = buf[resume:]
        self._scan_state = None
        return True

    def _step_after_function(self, final: bool) -> bool:
        buf = self._buf
        rest = WHITESPACE.match(buf).end()
        if buf.startswith(TOOL_CALL_CLOSE, rest):
            self._buf = buf[rest + len(TOOL_CALL_CLOSE) :]
        elif not final and (rest == len(buf) or _proper_prefix_of(buf[rest:], (TOOL_CALL_CLOSE,))):
            return False
        self._call = None
        self._state = "content"
        return True

    def _value_end(self, buf: str, start: int, name: str, final: bool) -> tuple[int, int] | None:
        """(value end, resume position) for a value starting at `start`, or None while the text cannot tell yet."""
        found = self._scan_closes(buf, start, final, skip_nested_calls=True)
        if found is None:
            return None
        if found >= 0:
            return found, found + len(PARAM_CLOSE)
        found = self._scan_closes(buf, start, final, skip_nested_calls=False)
        assert found is not None
        if found >= 0:
            return found, found + len(PARAM_CLOSE)
        call = self._call
        assert call is not None
        bound = buf.find(TOOL_CALL_CLOSE, start)
        bound = len(buf) if bound < 0 else bound
        for match in PARAM_OPEN.finditer(buf, start, bound):
            other = match.group(1)
            if other != name and other not in call.seen and call.knows(other):
                return match.start(), match.start()
        fn = buf.rfind(FUNCTION_CLOSE, start, bound)
        if fn >= 0 and not buf[fn + len(FUNCTION_CLOSE) : bound].strip():
            return fn, fn
        end = bound
        if bound == len(buf):
            # a stream cut inside a closing tag: leave the partial tag out of the value
            lt = buf.rfind("<", start)
            if lt >= 0 and _proper_prefix_of(buf[lt:], CLOSING_TAGS):
                end = lt
        return end, bound

    def _scan_closes(self, buf: str, start: int, final: bool, *, skip_nested_calls: bool) -> int | None:
        """Position of the structural `</parameter>` (rules A/B), -1 if there is none, None to wait for text.

        Rule A runs on every delta while a long value streams in, so it saves where it stopped (position, depth,
        nesting) and resumes there: the text before that point cannot change.
        """
        call = self._call
        assert call is not None
        pos, depth, nested_calls = start, 0, 0
        if skip_nested_calls and self._scan_state is not None and self._scan_state[0] == start:
            _, pos, depth, nested_calls = self._scan_state
        for match in VALUE_TAGS.finditer(buf, pos):
            tag = match.group(0)
            if tag == TOOL_CALL_OPEN:
                nested_calls += skip_nested_calls
            elif tag == TOOL_CALL_CLOSE:
                if not nested_calls:
                    return -1
                nested_calls -= 1
            elif nested_calls:
                pass
            elif tag != PARAM_CLOSE:
                depth += call.knows(match.group(1))
            elif depth:
                depth -= 1
            else:
                structural = self._closes_value(buf, match.end(), final)
                if structural is None:
                    self._scan_state = (start, match.start(), depth, nested_calls)
                    return None
                if structural:
                    return match.start()
            pos = match.end()
        if final:
            return -1
        # only a tag that starts at the last "<" can still be incomplete
        lt = buf.rfind("<", pos)
        self._scan_state = (start, len(buf) if lt < 0 else lt, depth, nested_calls)
        return None

    def _closes_value(self, buf: str, pos: int, final: bool) -> bool | None:
        """Is the `</parameter>` ending at `pos` structural, judged by what follows it (None: cannot tell yet)."""
        call = self._call
        assert call is not None
        nxt = WHITESPACE.match(buf, pos).end()
        if nxt == len(buf):
            return True if final else None
        if buf.startswith(FUNCTION_CLOSE, nxt) or buf.startswith(TOOL_CALL_CLOSE, nxt):
            return True
        match = PARAM_OPEN.match(buf, nxt)
        if match is not None:
            if call.knows(match.group(1)):
                return True
            bound = buf.find(TOOL_CALL_CLOSE, nxt)
            if bound < 0 and not final:
                return None
            bound = len(buf) if bound < 0 else bound
            opens = sum(1 for _ in PARAM_OPEN.finditer(buf, nxt, bound))
            return opens == buf.count(PARAM_CLOSE, nxt, bound)
        tail = buf[nxt:]
        if buf.startswith(PARAM_PREFIX, nxt) and not any(ch in tail[len(PARAM_PREFIX) :] for ch in "<>\n"):
            return True if final else None
        if _proper_prefix_of(tail, (FUNCTION_CLOSE, TOOL_CALL_CLOSE, PARAM_PREFIX)):
            return True if final else None
        return False

    def _emit_arguments(self, piece: str) -> None:
        assert self._call is not None
        self._out.append({"tool_calls": [{"index": self._call.index, "function": {"arguments": piece}}]})

    def _emit_content(self, text: str, force: bool = False) -> None:
        if not text:
            return
        if not force and not self._stretch_has_text:
            if not text.strip():
                self._pending_space += text
                return
            text, self._pending_space = self._pending_space + text, ""
            self._stretch_has_text = True
        if self._out and "content" in self._out[-1]:
            self._out[-1]["content"] += text
        else:
            self._out.append({"content": text})


def parse_tool_calls(text: str, tools: list[dict[str, Any]] | None) -> tuple[str | None, list[dict[str, str]]]:
    """One-shot parse: (content or None, [{"name", "arguments"}]) for a complete text.

    `tools` (the request's OpenAI tool list) only decides value types; without it every value stays a string.
    Whether to run the tool parser at all (tools present, tool_choice not "none") is the caller's decision.
    """
    stream = ToolCallStream(tools)
    fragments = stream.feed(text) + stream.finish()
    content, calls = join_fragments(fragments)
    return content, [{"name": call["name"], "arguments": call["arguments"]} for call in calls]


def join_fragments(fragments: list[dict[str, Any]]) -> tuple[str | None, list[dict[str, str]]]:
    """Join tool-parser fragments into (content or None, [{"id", "name", "arguments"}])."""
    content: list[str] = []
    calls: list[dict[str, str]] = []
    for fragment in fragments:
        content.append(fragment.get("content", ""))
        for entry in fragment.get("tool_calls", ()):
            if "id" in entry:
                calls.append({"id": entry["id"], "name": entry["function"]["name"], "arguments": ""})
            calls[entry["index"]]["arguments"] += entry["function"]["arguments"]
    return "".join(content) or None, calls

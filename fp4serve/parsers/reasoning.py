"""Qwen3 reasoning parser: split model output into reasoning and content (spec §8 with the §12b decisions).

Qwen3.5's template puts `<think>\\n` in the prompt, so the output normally starts inside the think block and only
`</think>` is generated. Reasoning ends at the first `</think>`, or at the first `<tool_call>` that is followed (after
whitespace) by `<function=` / `<function ` — Qwen3.5 sometimes calls a tool without closing its think block, and the
call must still be parsed. A `<think>` written by the model before that point is removed (older templates had the
model open the block itself). Without an end, a thinking output was cut off while thinking: all of it is reasoning.
With thinking off (the prompt already closed the block) everything is content and tags are left alone.

`parse_reasoning` is the one-shot form; `ReasoningStream` is the incremental form. The stream holds back a tail that
could still become a tag (`</thi`, `<tool_ca`, `<tool_call>\\n<func`), so what it emits never turns out later to be
markup, and the joined stream equals the one-shot result for every way of splitting the text. Empty strings are
reported as None.
"""

from __future__ import annotations

import re

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
TOOL_CALL_OPEN = "<tool_call>"
# what must follow `<tool_call>` (after whitespace) for it to end reasoning
FUNCTION_OPEN = re.compile(r"<function[\s=]")
FUNCTION_WORD = "<function"


def thinking_from_prompt(prompt: str, default: bool = True) -> bool:
    """Whether generation starts inside a think block: the prompt's last think tag is `<think>`, not `</think>`.

    With `enable_thinking: false` the Qwen3.5 template ends the prompt with `<think>\\n\\n</think>\\n\\n`; with
    thinking on it ends with `<think>\\n`. A prompt with neither tag gives `default` (vLLM's parser assumes thinking).
    """
    opened, closed = prompt.rfind(THINK_OPEN), prompt.rfind(THINK_CLOSE)
    if opened < 0 and closed < 0:
        return default
    return opened > closed


def tool_call_follows(text: str, pos: int) -> bool | None:
    """For a `<tool_call>` at `pos`: True if `<function=`/`<function ` follows after whitespace, False if something
    else does, None if `text` ends before that is known."""
    after = text[pos + len(TOOL_CALL_OPEN) :].lstrip()
    if FUNCTION_OPEN.match(after):
        return True
    if FUNCTION_WORD.startswith(after):
        return None
    return False


def reasoning_end(text: str) -> tuple[int, int] | None:
    """(start, content start) of the first reasoning end in a complete text, or None if reasoning never ends."""
    close = text.find(THINK_CLOSE)
    search_end = close if close >= 0 else len(text)
    pos = text.find(TOOL_CALL_OPEN, 0, search_end)
    while pos >= 0:
        if tool_call_follows(text, pos):
            return pos, pos
        pos = text.find(TOOL_CALL_OPEN, pos + 1, search_end)
    if close >= 0:
        return close, close + len(THINK_CLOSE)
    return None


def parse_reasoning(text: str, thinking: bool = True) -> tuple[str | None, str | None]:
    """Split a complete output into (reasoning, content); each is None when empty."""
    if not thinking:
        return None, text or None
    end = reasoning_end(text)
    reasoning, content = (text, "") if end is None else (text[: end[0]], text[end[1] :])
    # only the first <think> inside the reasoning is dropped, the text around it stays
    reasoning = reasoning.replace(THINK_OPEN, "", 1)
    return reasoning or None, content or None


class ReasoningStream:
    """Incremental `parse_reasoning`: `feed(delta)` and `finish()` return (reasoning piece, content piece)."""

    def __init__(self, thinking: bool = True) -> None:
        self._in_reasoning = thinking
        self._think_dropped = False
        self._held = ""

    def feed(self, delta: str) -> tuple[str, str]:
        if not self._in_reasoning:
            return "", delta
        self._held += delta
        return self._scan(final=False)

    def finish(self) -> tuple[str, str]:
        if not self._in_reasoning:
            return "", ""
        return self._scan(final=True)

    def _scan(self, final: bool) -> tuple[str, str]:
        text, pieces, start, pos = self._held, [], 0, 0
        while True:
            lt = text.find("<", pos)
            if lt < 0:
                break
            if text.startswith(THINK_CLOSE, lt):
                pieces.append(text[start:lt])
                return self._end_reasoning(pieces, text[lt + len(THINK_CLOSE) :])
            if not self._think_dropped and text.startswith(THINK_OPEN, lt):
                pieces.append(text[start:lt])
                self._think_dropped = True
                start = pos = lt + len(THINK_OPEN)
                continue
            if text.startswith(TOOL_CALL_OPEN, lt):
                follows = tool_call_follows(text, lt)
                if follows:
                    pieces.append(text[start:lt])
                    return self._end_reasoning(pieces, text[lt:])
                if follows is None and not final:
                    pieces.append(text[start:lt])
                    self._held = text[lt:]
                    return "".join(pieces), ""
            elif not final and lt > len(text) - len(TOOL_CALL_OPEN) and self._could_be_tag(text[lt:]):
                pieces.append(text[start:lt])
                self._held = text[lt:]
                return "".join(pieces), ""
            pos = lt + 1
        pieces.append(text[start:])
        self._held = ""
        return "".join(pieces), ""

    def _could_be_tag(self, tail: str) -> bool:
        tags = (THINK_CLOSE, TOOL_CALL_OPEN) if self._think_dropped else (THINK_CLOSE, TOOL_CALL_OPEN, THINK_OPEN)
        return any(tag.startswith(tail) for tag in tags)

    def _end_reasoning(self, pieces: list[str], rest: str) -> tuple[str, str]:
        self._in_reasoning = False
        self._held = ""
        return "".join(pieces), rest

"""When a request stops: stop tokens, eos, max_tokens, and stop strings found across streamed text deltas.

Token rules follow vLLM v1's order: the length cap first, then the tokenizer's eos (finish "stop", stop_reason
None), then stop token ids (stop_reason = the id). The other eos ids of generation_config count as stop token ids,
as vLLM adds them there, so they report their id as stop_reason. While a request is under `min_tokens` the sampler
never draws these tokens, and stop strings are not looked for.

Stop strings are searched only where the new delta can have completed one (the delta plus the longest stop string
minus one character before it), so a match split across deltas is found and each step costs O(delta). When
streaming, the last `len(longest stop) - 1` characters are held back so that the start of a stop string is never
sent before we know whether it completes (not needed with `include_stop_str_in_output`). Where several stop
strings complete in one delta, the earliest in the text wins.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fp4serve.sampling.params import SamplingParams


def check_stop_token(
    params: SamplingParams, token_id: int, num_output_tokens: int, eos_token_ids: Sequence[int]
) -> tuple[str, int | None] | None:
    """Finish reason and stop_reason after `token_id` became output token number `num_output_tokens`, else None.

    `eos_token_ids[0]` is the tokenizer's eos; the rest (generation_config's) act as stop token ids unless
    `ignore_eos`. The engine separately ends a request that fills the context ("length").
    """
    if params.max_tokens is not None and num_output_tokens >= params.max_tokens:
        return "length", None
    if num_output_tokens < params.min_tokens:
        return None
    if not params.ignore_eos and eos_token_ids:
        if token_id == eos_token_ids[0]:
            return "stop", None
        if token_id in eos_token_ids:
            return "stop", token_id
    if token_id in params.stop_token_ids:
        return "stop", token_id
    return None


def find_stop_string(
    text: str, new_char_count: int, stop: Sequence[str], include_stop_str_in_output: bool = False
) -> tuple[str, int] | None:
    """The stop string completed by the last `new_char_count` characters of `text`, and where to cut the text.

    The cut is the match's start, or its end with `include_stop_str_in_output`. None when nothing matched.
    """
    best: tuple[int, str] | None = None
    for stop_str in stop:
        start = max(0, len(text) - new_char_count - len(stop_str) + 1)
        index = text.find(stop_str, start)
        if index >= 0 and (best is None or index < best[0]):
            best = (index, stop_str)
    if best is None:
        return None
    index, stop_str = best
    return stop_str, index + len(stop_str) if include_stop_str_in_output else index


class StopStringMatcher:
    """Streams a request's text: `feed(delta)` returns what may be sent now, cut at the first stop string.

    After a stop string matched, `stop_str` holds it and `feed` must not be called again. `flush()` returns the
    held-back tail when the request ends for another reason. `text` is the whole output text kept so far.
    """

    def __init__(self, stop: Sequence[str], *, include_stop_str_in_output: bool = False, min_tokens: int = 0):
        self.stop = tuple(stop)
        self.include_stop_str_in_output = include_stop_str_in_output
        self.min_tokens = min_tokens
        longest = max((len(s) for s in self.stop), default=0)
        self._window = max(longest - 1, 0)
        self._hold = 0 if include_stop_str_in_output else self._window
        self.stop_str: str | None = None
        self._sent: list[str] = []
        self._pending = ""
        self._tail = ""

    @classmethod
    def from_params(cls, params: SamplingParams) -> StopStringMatcher:
        return cls(
            params.stop,
            include_stop_str_in_output=params.include_stop_str_in_output,
            min_tokens=params.min_tokens,
        )

    @property
    def stopped(self) -> bool:
        return self.stop_str is not None

    @property
    def text(self) -> str:
        return "".join(self._sent) + self._pending

    def feed(self, delta: str, num_output_tokens: int | None = None) -> str:
        """Add newly decoded text (`num_output_tokens` counts tokens so far, for min_tokens)."""
        assert self.stop_str is None, "feed after a stop string matched"
        pending = self._pending + delta
        can_stop = num_output_tokens is None or num_output_tokens > self.min_tokens
        if self.stop and delta and can_stop:
            match = find_stop_string(self._tail + delta, len(delta), self.stop, self.include_stop_str_in_output)
            if match is not None:
                self.stop_str, cut = match
                # cut is relative to tail + delta; pending ends where that window ends
                pending = pending[: len(pending) - (len(self._tail) + len(delta) - cut)]
                self._pending = ""
                self._sent.append(pending)
                return pending
        if self._window:
            self._tail = (self._tail + delta)[-self._window :]
        release = max(len(pending) - self._hold, 0)
        out, self._pending = pending[:release], pending[release:]
        self._sent.append(out)
        return out

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        self._sent.append(out)
        return out

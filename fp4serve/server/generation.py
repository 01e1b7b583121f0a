"""The server's view of the engine: one text stream per choice, with admission control and metrics around it.

`Generation.stream` turns the engine's token deltas into `TextDelta`s (new text, logprobs, finish), records the
Prometheus numbers as they happen (time to first token, inter-token latency, token counts) and guarantees the
request leaves the engine: if the consumer stops early (client gone, error), the request is aborted, which frees
its KV blocks and state slot. `Admission` is the overload guard: requests that are waiting for their first token
are counted, and one more than `--max-waiting-requests` is refused with 503 instead of queueing without bound.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from fp4serve.server.errors import APIError
from fp4serve.server.metrics import Metrics
from fp4serve.server.responses import TokenLogprob
from fp4serve.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class TextDelta:
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0


class Admission:
    """Counts requests that wait for their first token and refuses new ones above the limit (None: no limit)."""

    def __init__(self, limit: int | None):
        self.limit = limit
        self.waiting = 0
        self.in_flight = 0

    def admit(self, count: int) -> Ticket:
        """Reserve `count` waiting places (one per choice) or raise 503."""
        if self.limit is not None and self.waiting + count > self.limit:
            raise APIError(
                f"The server is overloaded: {self.waiting} requests are already waiting for the engine "
                f"(limit {self.limit}, set by --max-waiting-requests). Please retry later.",
                503,
                "ServiceUnavailableError",
            )
        return Ticket(self, count)


class Ticket:
    """Waiting places reserved at admission; each engine stream claims one, `release` returns the unclaimed."""

    def __init__(self, admission: Admission, count: int):
        self.admission = admission
        self.unclaimed = count
        admission.waiting += count

    def claim(self) -> bool:
        if self.unclaimed <= 0:
            return False
        self.unclaimed -= 1
        return True

    def release(self) -> None:
        self.admission.waiting -= self.unclaimed
        self.unclaimed = 0


def to_token_logprobs(entries: list[Any] | None) -> list[TokenLogprob]:
    """The engine's per-token logprob entries as `TokenLogprob`s (sampled token first, then the top k)."""
    out: list[TokenLogprob] = []
    for entry in entries or []:
        if entry is None:
            continue
        if isinstance(entry, TokenLogprob):
            out.append(entry)
            continue
        token_id = int(entry.token_id)
        top_ids = list(getattr(entry, "top_token_ids", None) or [])
        top_lps = list(getattr(entry, "top_logprobs", None) or [])
        out.append(
            TokenLogprob(
                token_id, float(entry.logprob), [(int(i), float(v)) for i, v in zip(top_ids, top_lps, strict=True)]
            )
        )
    return out


async def _checked(deltas: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """The engine's deltas, with its input errors as 400 and a stopped engine as 503."""
    from fp4serve.engine.async_engine import EngineDeadError

    try:
        async with aclosing(deltas):
            async for delta in deltas:
                yield delta
    except ValueError as exc:
        raise APIError(str(exc), 400, "BadRequestError") from exc
    except EngineDeadError as exc:
        raise APIError(f"The engine is not running: {exc}", 503, "ServiceUnavailableError") from exc


class Generation:
    """Runs requests on an `AsyncEngine` and yields text deltas; owns admission and the per-request metrics."""

    def __init__(self, engine: Any, tokenizer: Tokenizer, metrics: Metrics, admission: Admission):
        self.engine = engine
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.admission = admission

    def _engine_deltas(self, request_id: str, prompt_ids: list[int], params: Any, mm_inputs: Any) -> AsyncIterator[Any]:
        if mm_inputs is None:
            return _checked(self.engine.generate(request_id, prompt_ids, params))
        return _checked(self.engine.generate(request_id, prompt_ids, params, mm_inputs=mm_inputs))

    async def stream(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: Any,
        ticket: Ticket | None = None,
        mm_inputs: Any = None,
    ) -> AsyncIterator[TextDelta]:
        if ticket is None or not ticket.claim():
            self.admission.waiting += 1
        self.admission.in_flight += 1
        waiting = True
        finished = False
        arrival = time.monotonic()
        last_token_time = arrival
        num_prompt, num_output = len(prompt_ids), 0
        detok = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=getattr(params, "skip_special_tokens", True))
        deltas = self._engine_deltas(request_id, prompt_ids, params, mm_inputs)
        try:
            async for delta in deltas:
                now = time.monotonic()
                if delta.new_token_ids:
                    if waiting:
                        waiting = False
                        self.admission.waiting -= 1
                        self.metrics.ttft.observe(now - arrival)
                    else:
                        self.metrics.itl.observe(now - last_token_time)
                    last_token_time = now
                num_prompt, num_output = delta.num_prompt_tokens, delta.num_output_tokens
                text = getattr(delta, "text", None)
                if text is None:
                    text = detok.feed(delta.new_token_ids)
                    if delta.finish_reason is not None:
                        text += detok.flush()
                if delta.finish_reason is not None:
                    finished = True
                    self.metrics.record_finished(delta.finish_reason, num_prompt, num_output, now - arrival)
                yield TextDelta(
                    text=text,
                    token_ids=list(delta.new_token_ids),
                    logprobs=to_token_logprobs(delta.new_logprobs),
                    finish_reason=delta.finish_reason,
                    stop_reason=delta.stop_reason,
                    num_prompt_tokens=num_prompt,
                    num_output_tokens=num_output,
                )
                if finished:
                    return
        finally:
            self.admission.in_flight -= 1
            if waiting:
                self.admission.waiting -= 1
            if not finished:
                self.engine.abort(request_id)
                self.metrics.record_finished("abort", num_prompt, num_output, time.monotonic() - arrival)
            await deltas.aclose()

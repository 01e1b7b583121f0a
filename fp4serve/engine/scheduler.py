"""Continuous batching under a token budget, vLLM-v1 style: each step gives each request a number of tokens.

There are no prefill and decode phases. A request has `num_tokens` known tokens (prompt plus generated) of which
`num_computed_tokens` are in the caches; a step schedules up to `max_num_batched_tokens` of the missing ones over at
most `max_num_seqs` requests. A decode is a request missing one token, a prefill chunk is a request missing more
than the budget leaves it, and one step may mix both. Running requests go first, in arrival order (FCFS), then
waiting ones are admitted while budget, sequence slots and KV blocks last. When a running request needs a KV block
and none is free, the latest-arrived running request is preempted by recompute: its blocks and state slot are
freed, its computed count drops to 0 and it goes back to the front of the waiting queue, its generated tokens now
part of what it must recompute. A request whose scheduled tokens reach its last known token gets a sampled token;
a prefill chunk that stops short samples nothing. Pure Python: no torch, unit-tested with a fake model.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from fp4serve.engine.kv_cache import BlockManager, StateSlots
from fp4serve.engine.request import Request, RequestStatus, check_stop


@dataclass(frozen=True, slots=True)
class ScheduledRequest:
    request: Request
    start: int  # tokens already cached (the context length)
    num_tokens: int  # tokens run this step: request.token_ids[start : start + num_tokens]
    sample: bool  # the chunk reaches the last known token, so this step samples the next one


@dataclass(frozen=True, slots=True)
class ScheduledBatch:
    entries: tuple[ScheduledRequest, ...]
    preempted: tuple[Request, ...] = ()

    @property
    def num_scheduled_tokens(self) -> dict[str, int]:
        return {e.request.request_id: e.num_tokens for e in self.entries}

    @property
    def total_tokens(self) -> int:
        return sum(e.num_tokens for e in self.entries)

    @property
    def is_empty(self) -> bool:
        return not self.entries


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        slots: StateSlots,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        eos_token_ids: Iterable[int] = (),
    ) -> None:
        assert slots.num_slots >= max_num_seqs, "every running request needs a state slot"
        self.blocks = blocks
        self.slots = slots
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        # order matters: the first is the tokenizer's eos (stop_reason None), the rest report their id
        self.eos_token_ids = tuple(dict.fromkeys(eos_token_ids))
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    def add_request(self, request: Request) -> None:
        assert request.request_id not in self.requests, f"duplicate request id {request.request_id!r}"
        assert 0 < request.num_tokens <= self.max_model_len
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def abort(self, request_id: str) -> Request | None:
        """Finish the request as aborted wherever it is; None when it is unknown or already finished."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        if request.status == RequestStatus.WAITING:
            self.waiting.remove(request)
            del self.requests[request_id]
            request.status = RequestStatus.FINISHED_ABORTED
        else:
            self.finish(request, RequestStatus.FINISHED_ABORTED)
        return request

    def finish(self, request: Request, status: RequestStatus) -> None:
        """End a running request (stop rule, stop string or abort) and give back its blocks and slot."""
        assert status.is_finished and request.status == RequestStatus.RUNNING
        self.running.remove(request)
        self._release(request)
        del self.requests[request.request_id]
        request.status = status

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        entries: list[ScheduledRequest] = []
        preempted: list[Request] = []

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            assert n > 0, "a running request always has at least its newest token to compute"
            end = request.num_computed_tokens + n
            while not self.blocks.can_allocate(request, end):
                # running is in arrival order and is walked from the front, so the tail is not scheduled yet
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    break
            else:
                self.blocks.allocate(request, end)
                entries.append(self._entry(request, n))
                budget -= n
                i += 1

        # like vLLM, admit nobody in a step that had to preempt: memory is short
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self.blocks.can_allocate(request, n):
                break
            self.waiting.popleft()
            self.blocks.allocate(request, n)
            self.slots.allocate(request)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            entries.append(self._entry(request, n))
            budget -= n

        return ScheduledBatch(tuple(entries), tuple(preempted))

    def update(self, batch: ScheduledBatch, sampled: Mapping[str, int]) -> list[Request]:
        """Advance computed counts, append sampled tokens, apply stop rules; returns the requests given a token."""
        updated: list[Request] = []
        for entry in batch.entries:
            request = entry.request
            if request.status != RequestStatus.RUNNING:
                continue
            assert request.num_computed_tokens == entry.start
            request.num_computed_tokens += entry.num_tokens
            if not entry.sample:
                continue
            request.append_output(sampled[request.request_id])
            status = check_stop(request, self.eos_token_ids, self.max_model_len)
            if status is not None:
                self.finish(request, status)
            updated.append(request)
        return updated

    def _entry(self, request: Request, n: int) -> ScheduledRequest:
        start = request.num_computed_tokens
        return ScheduledRequest(request, start, n, start + n == request.num_tokens)

    def _preempt(self, request: Request) -> None:
        self._release(request)
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _release(self, request: Request) -> None:
        self.blocks.free(request)
        self.slots.free(request)

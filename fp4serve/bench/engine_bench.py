"""Decode, prefill and time-to-first-token measurements through the real `Engine` (scheduler, runner, sampler).

Every number is wall time around `Engine.step()` calls with the device synchronised on both sides, so it includes
everything a served request pays per step (scheduling, batch building, the forward, sampling, the copy of the
tokens back to the host). Prompts are random token ids, fresh for every run; sampling is greedy with `ignore_eos`.

- decode: `batch` requests with `context_len`-token prompts are prefilled first (chunked and mixed by the scheduler
  as in serving; requests prefilled early already decode while later ones prefill, so they may start the timed part
  a few tokens past `context_len`). Once every request has its first token, each step is a pure decode step of
  exactly `batch` tokens (checked); `warmup` steps are dropped and the next `steps` are timed one by one. The
  result is the median step time and `batch / median` tokens per second. The requests are then aborted.
- prefill: `num_prompts` prompts of `prompt_len` tokens are queued at once with `max_tokens=1`; the time from the
  first step to the last prompt's first token gives prompt tokens per second.
- TTFT: one `prompt_len` prompt on an idle engine: the time from `add_request` to the step that returns its first
  token (prefill of the whole prompt, lm_head and sampling; no tokenization or HTTP).

The engine's cache is sized exactly for these runs (`kv_cache_memory_bytes`), so no profiling forward is needed.
"""

from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import dataclass

import torch

from fp4serve.config import EngineConfig
from fp4serve.engine.engine import Engine
from fp4serve.engine.kv_cache import blocks_needed
from fp4serve.model.qwen3_5 import Qwen35ForCausalLM
from fp4serve.sampling import SamplingParams


@dataclass(frozen=True)
class Workload:
    """What the engine will be asked to run; sizes its caches."""

    batch_sizes: tuple[int, ...]
    context_len: int
    warmup_steps: int
    decode_steps: int
    prefill_prompts: int
    prefill_len: int
    ttft_len: int
    max_num_batched_tokens: int
    block_size: int

    def prefill_phase_steps(self, batch: int) -> int:
        """An upper bound on the steps that prefill `batch` contexts (decodes of early requests share the budget)."""
        per_step = max(1, self.max_num_batched_tokens - batch)
        return -(-batch * self.context_len // per_step) + 2

    def decode_max_tokens(self, batch: int) -> int:
        return self.prefill_phase_steps(batch) + self.warmup_steps + self.decode_steps + 2

    def max_model_len(self) -> int:
        longest_decode = max((self.context_len + self.decode_max_tokens(b) for b in self.batch_sizes), default=0)
        return max(longest_decode, self.prefill_len + 2, self.ttft_len + 2) + 1

    def max_num_seqs(self) -> int:
        return max((*self.batch_sizes, self.prefill_prompts, 1))

    def kv_blocks(self) -> int:
        bs = self.block_size
        decode = max(
            (b * blocks_needed(self.context_len + self.decode_max_tokens(b) + 1, bs) for b in self.batch_sizes),
            default=0,
        )
        prefill = self.prefill_prompts * blocks_needed(self.prefill_len + 2, bs)
        return max(decode, prefill, blocks_needed(self.ttft_len + 2, bs), 1)

    def cache_bytes(self, model: Qwen35ForCausalLM, dtype: torch.dtype) -> int:
        state = model.state_bytes_per_slot(dtype) * (self.max_num_seqs() + 1)
        return state + self.kv_blocks() * self.block_size * model.kv_bytes_per_token(dtype)


def make_engine(
    model: Qwen35ForCausalLM,
    workload: Workload,
    *,
    device: torch.device,
    dtype: torch.dtype,
    enforce_eager: bool,
    max_position_embeddings: int,
    seed: int = 0,
) -> Engine:
    config = EngineConfig.create(
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        max_num_seqs=workload.max_num_seqs(),
        max_num_batched_tokens=workload.max_num_batched_tokens,
        block_size=workload.block_size,
        kv_cache_memory_bytes=workload.cache_bytes(model, dtype),
        max_model_len=workload.max_model_len(),
        enforce_eager=enforce_eager,
        seed=seed,
    )
    return Engine(model, config, max_position_embeddings=max_position_embeddings)


@dataclass(frozen=True)
class DecodeResult:
    batch: int
    context_len: int  # prompt length; the timed steps run at context_len + a few generated tokens
    mean_context_len: float  # average cached tokens per sequence over the timed steps
    warmup_steps: int
    step_s: list[float]
    context_fill_s: float  # wall time of the prefill steps before decoding

    @property
    def median_step_s(self) -> float:
        return statistics.median(self.step_s)

    @property
    def tok_s(self) -> float:
        return self.batch / self.median_step_s


@dataclass(frozen=True)
class PrefillResult:
    num_prompts: int
    prompt_len: int
    run_s: list[float]  # one entry per timed run

    @property
    def median_s(self) -> float:
        return statistics.median(self.run_s)

    @property
    def tok_s(self) -> float:
        return self.num_prompts * self.prompt_len / self.median_s


class EngineBench:
    """Runs the measurements on one engine; request ids and prompts never repeat."""

    def __init__(self, engine: Engine, *, vocab_size: int, seed: int = 0) -> None:
        self.engine = engine
        self.device = engine.device
        self.vocab_size = vocab_size
        self.gen = torch.Generator().manual_seed(seed)
        self._ids = itertools.count()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _add(self, prompt_len: int, max_tokens: int) -> str:
        rid = f"bench-{next(self._ids)}"
        prompt = torch.randint(0, self.vocab_size, (prompt_len,), generator=self.gen).tolist()
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        self.engine.add_request(rid, prompt, params)
        return rid

    def check_finite(self, prompt_len: int = 16) -> bool:
        """One short request with a hook on the final norm: are the hidden states finite? (Also warms up.)"""
        flags: list[torch.Tensor] = []
        norm = self.engine.model.model.norm
        handle = norm.register_forward_hook(lambda _m, _i, out: flags.append(torch.isfinite(out).all()))
        try:
            self._add(prompt_len, 2)
            self._drain()
        finally:
            handle.remove()
        return bool(flags) and all(bool(f) for f in flags)

    def _drain(self) -> None:
        while self.engine.has_unfinished():
            self.engine.step()

    def abort_all(self) -> None:
        """Abort whatever a failed measurement left in the engine."""
        for rid in list(self.engine.scheduler.requests):
            self.engine.abort(rid)
        self._drain()

    def decode(self, *, batch: int, context_len: int, warmup: int, steps: int, max_tokens: int) -> DecodeResult:
        rids = [self._add(context_len, max_tokens) for _ in range(batch)]
        waiting = set(rids)
        self._sync()
        t0 = time.perf_counter()
        while waiting:
            for delta in self.engine.step():
                if delta.new_token_ids:
                    waiting.discard(delta.request_id)
        self._sync()
        fill_s = time.perf_counter() - t0
        times: list[float] = []
        contexts: list[int] = []
        for i in range(warmup + steps):
            stats = self.engine.stats()
            if stats.num_running != batch or stats.num_waiting:
                raise RuntimeError(f"decode batch {batch}: {stats.num_running} running, {stats.num_waiting} waiting")
            self._sync()
            t = time.perf_counter()
            deltas = self.engine.step()
            self._sync()
            dt = time.perf_counter() - t
            if len(deltas) != batch or any(len(d.new_token_ids) != 1 or d.finished for d in deltas):
                raise RuntimeError(f"decode batch {batch}: a timed step was not one new token for every request")
            if i >= warmup:
                times.append(dt)
                # tokens cached before this step: the prompt and every output token but the two newest
                contexts.append(sum(d.num_prompt_tokens + d.num_output_tokens - 2 for d in deltas))
        for rid in rids:
            self.engine.abort(rid)
        self._drain()
        return DecodeResult(batch, context_len, sum(contexts) / (batch * len(contexts)), warmup, times, fill_s)

    def prefill(self, *, num_prompts: int, prompt_len: int, warmup: int, runs: int) -> tuple[PrefillResult, int]:
        """Timed runs of the prefill workload, and the number of engine steps one run took."""
        times: list[float] = []
        num_steps = 0
        for i in range(warmup + runs):
            for _ in range(num_prompts):
                self._add(prompt_len, 1)
            self._sync()
            t = time.perf_counter()
            num_steps = 0
            while self.engine.has_unfinished():
                self.engine.step()
                num_steps += 1
            self._sync()
            if i >= warmup:
                times.append(time.perf_counter() - t)
        return PrefillResult(num_prompts, prompt_len, times), num_steps

    def ttft(self, *, prompt_len: int, warmup: int, runs: int) -> list[float]:
        """Seconds from add_request to the first token of one prompt on an idle engine, per timed run."""
        times: list[float] = []
        for i in range(warmup + runs):
            assert not self.engine.has_unfinished()
            self._sync()
            t = time.perf_counter()
            rid = self._add(prompt_len, 1)
            first = False
            while not first:
                first = any(d.request_id == rid and d.new_token_ids for d in self.engine.step())
            self._sync()
            if i >= warmup:
                times.append(time.perf_counter() - t)
            self._drain()
        return times

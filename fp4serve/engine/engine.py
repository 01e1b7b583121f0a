"""The synchronous engine: requests in, one batched model step per `step()`, per-request output deltas out.

`step()` chains scheduler -> runner (build the batch, forward, sample) -> scheduler update (append tokens, stop
rules, free caches) and returns one `RequestOutputDelta` per request that got a token or finished. Startup sizes
the caches (see `memory.py`): on a GPU by profiling a forward of `max_num_batched_tokens` tokens, on CPU from the
`kv_cache_memory_bytes` budget. The engine is single-threaded on purpose; `AsyncEngine` drives it from one
background thread for the server, and `LLM` drives it in a loop for offline use.

A checkpoint with a vision tower (config.json `vision_config` plus `model.visual.*` tensors) also gets the tower,
unquantized: BF16 on a GPU, the engine dtype on CPU. Requests then may carry a `MultimodalPrompt` (`mm_inputs`),
whose media the runner encodes once, before the first chunk that needs them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fp4serve.config import DEFAULT_CPU_CACHE_BYTES, EngineConfig
from fp4serve.engine.kv_cache import BlockManager, StateSlots
from fp4serve.engine.memory import MemorySnapshot, format_bytes, gpu_cache_budget, plan_cache
from fp4serve.engine.request import Request, RequestStatus
from fp4serve.engine.runner import ModelRunner
from fp4serve.engine.scheduler import Scheduler
from fp4serve.sampling.stopping import StopStringMatcher
from fp4serve.tokenizer import IncrementalDetokenizer, Tokenizer

if TYPE_CHECKING:
    from fp4serve.sampling import SamplingParams

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RequestOutputDelta:
    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[Any] | None
    finish_reason: str | None  # None while running; "stop", "length" or "abort"
    num_prompt_tokens: int
    num_output_tokens: int
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    # text of the new tokens (None for an engine without a tokenizer); a tail that could still turn out to start
    # a stop string is held back until that is decided, and the text ends where a stop string begins
    text: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True, slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    used_kv_blocks: int
    total_kv_blocks: int
    used_state_slots: int
    total_state_slots: int
    num_preemptions: int
    max_model_len: int


class Engine:
    def __init__(
        self,
        model: Any,
        config: EngineConfig,
        *,
        eos_token_ids: tuple[int, ...] = (),
        tokenizer: Tokenizer | None = None,
        max_position_embeddings: int | None = None,
        memory_baseline: MemorySnapshot | None = None,
        visual: Any = None,
    ) -> None:
        self.config = config
        self.model = model
        self.visual = visual
        self.tokenizer = tokenizer
        self.eos_token_ids = tuple(eos_token_ids)
        self.device = torch.device(config.resolved_device())
        # the caches hold the model's activations, so a loaded model's own dtype wins over the config's
        self.dtype = getattr(model, "dtype", None) or getattr(torch, config.resolved_dtype_name(self.device.type))
        model_config = getattr(model, "config", None)
        if max_position_embeddings is None:
            max_position_embeddings = int(model_config.max_position_embeddings)
        self.vocab_size: int | None = getattr(model_config, "vocab_size", None)
        self.runner = ModelRunner(
            model,
            device=self.device,
            dtype=self.dtype,
            block_size=config.block_size,
            enforce_eager=config.enforce_eager,
            seed=config.seed,
            eos_token_ids=self.eos_token_ids,
            vocab_size=tokenizer.vocab_size if tokenizer is not None else None,
            visual=visual,
        )
        plan = plan_cache(
            budget_bytes=self._cache_budget(memory_baseline),
            kv_bytes_per_token=model.kv_bytes_per_token(self.dtype),
            state_bytes_per_slot=model.state_bytes_per_slot(self.dtype),
            block_size=config.block_size,
            max_num_seqs=config.max_num_seqs,
            max_model_len=config.max_model_len,
            max_position_embeddings=max_position_embeddings,
        )
        self.max_model_len = plan.max_model_len
        self.runner.allocate_cache(plan)
        logger.info(
            "cache: %d KV blocks of %d tokens (%d tokens), %d state slots; max_model_len %d",
            plan.num_blocks,
            plan.block_size,
            plan.num_blocks * plan.block_size,
            plan.num_slots,
            plan.max_model_len,
        )
        # the plan may have lowered max_num_seqs (auto-fit); the spare slot is the runner's padding slot
        max_num_seqs = plan.num_slots - 1
        self.scheduler = Scheduler(
            BlockManager(plan.num_blocks, plan.block_size),
            StateSlots(max_num_seqs),
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=plan.max_model_len,
            eos_token_ids=self.eos_token_ids,
        )
        self._arrivals = 0
        self._pending: list[RequestOutputDelta] = []
        self._text: dict[str, _TextState] = {}

    @classmethod
    def from_pretrained(cls, path: str | Path, config: EngineConfig) -> Engine:
        """Load the model at `path` (BF16 or NVFP4) and its tokenizer, and size the caches around the model."""
        from fp4serve.model.loader import load_model
        from fp4serve.model.vision import has_vision_tower, load_vision_model

        path = Path(path)
        tokenizer = Tokenizer.from_dir(path)
        device = torch.device(config.resolved_device())
        baseline = MemorySnapshot.take(device) if device.type == "cuda" else None
        dtype = getattr(torch, config.resolved_dtype_name(device.type))
        model = load_model(path, device=device, dtype=dtype, linear_mode=config.linear_mode)
        visual = None
        if has_vision_tower(path):
            # never quantized; BF16 is the checkpoint's own precision on a GPU, CPU runs the engine dtype
            visual_dtype = torch.bfloat16 if device.type == "cuda" else dtype
            visual = load_vision_model(path, device=device, dtype=visual_dtype)
        return cls(
            model,
            config,
            eos_token_ids=tokenizer.eos_token_ids,
            tokenizer=tokenizer,
            max_position_embeddings=read_max_position_embeddings(path),
            memory_baseline=baseline,
            visual=visual,
        )

    def _cache_budget(self, baseline: MemorySnapshot | None) -> int:
        if self.config.kv_cache_memory_bytes is not None:
            return self.config.kv_cache_memory_bytes
        if self.device.type != "cuda":
            return DEFAULT_CPU_CACHE_BYTES
        if baseline is None:
            # the model was loaded before the engine saw the device: count its memory as already ours
            torch.cuda.synchronize(self.device)
            free, total = torch.cuda.mem_get_info(self.device)
            baseline = MemorySnapshot(free + torch.cuda.memory_reserved(self.device), total, 0)
        budget = gpu_cache_budget(
            self.device,
            self.config.gpu_memory_utilization,
            baseline,
            lambda: self.runner.profile_run(self.config.max_num_batched_tokens, self.config.max_num_seqs),
        )
        if self.config.enforce_eager:
            return budget
        # decode CUDA graphs keep their activations in a private pool for good: reserve it inside the same share
        graph_pool = self.runner.decode_activation_bytes(self.config.max_num_seqs)
        logger.info("memory: %s reserved for the decode CUDA graphs' pool", format_bytes(graph_pool))
        return budget - graph_pool

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *, mm_inputs: Any = None
    ) -> None:
        """Queue a request; bad input (empty or too long prompt, unknown ids, duplicate id) raises ValueError."""
        if request_id in self.scheduler.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        prompt = [int(t) for t in prompt_token_ids]
        if not prompt:
            raise ValueError("the prompt is empty: at least one token is needed")
        if len(prompt) > self.max_model_len:
            raise ValueError(
                f"this model's maximum context length is {self.max_model_len} tokens, but the prompt has "
                f"{len(prompt)} tokens"
            )
        if self.vocab_size is not None and not all(0 <= t < self.vocab_size for t in prompt):
            bad = next(t for t in prompt if not 0 <= t < self.vocab_size)
            raise ValueError(f"token id {bad} is out of vocabulary (size {self.vocab_size})")
        params.validate(vocab_size=self.vocab_size)
        if mm_inputs is not None:
            self._check_mm_inputs(prompt, mm_inputs)
        request = Request(request_id, prompt, params, arrival_index=self._arrivals, mm_inputs=mm_inputs)
        self._arrivals += 1
        self.scheduler.add_request(request)
        if self.tokenizer is not None:
            self._text[request_id] = _TextState(
                IncrementalDetokenizer(self.tokenizer, skip_special_tokens=params.skip_special_tokens),
                StopStringMatcher.from_params(params),
            )

    def _check_mm_inputs(self, prompt: list[int], mm_inputs: Any) -> None:
        if mm_inputs.items and self.visual is None:
            raise ValueError("this model has no vision tower: image and video input is not supported")
        if list(mm_inputs.token_ids) != prompt:
            raise ValueError("prompt_token_ids must be the multimodal prompt's expanded ids (mm_inputs.token_ids)")

    def abort(self, request_id: str) -> bool:
        """Abort a waiting or running request; its final delta (finish_reason "abort") comes with the next step."""
        request = self.scheduler.abort(request_id)
        if request is None:
            return False
        self._forget(request_id)
        self._pending.append(self._delta(request, [], text="" if self.tokenizer is not None else None))
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending)

    def step(self) -> list[RequestOutputDelta]:
        deltas, self._pending = self._pending, []
        batch = self.scheduler.schedule()
        if batch.is_empty:
            return deltas
        output = self.runner.execute(batch)
        for request in self.scheduler.update(batch, output.token_ids):
            text = self._detokenize(request)
            logprobs = output.logprobs.get(request.request_id)
            logprobs_list = None if logprobs is None else [logprobs]
            deltas.append(self._delta(request, [request.token_ids[-1]], logprobs_list, text))
            if request.is_finished:
                self._forget(request.request_id)
        return deltas

    def _detokenize(self, request: Request) -> str | None:
        """Text of the request's newest token through its stop-string matcher; a matched stop string ends it."""
        state = self._text.get(request.request_id)
        if state is None:
            return None
        params = request.params
        stopped_by_token = request.status == RequestStatus.FINISHED_STOPPED
        # like vLLM, the text of an eos / stop token is left out unless stop strings are to be included
        text = (
            ""
            if stopped_by_token and not params.include_stop_str_in_output
            else state.detok.feed(request.token_ids[-1:])
        )
        if request.is_finished:
            text += state.detok.flush()
        out = state.matcher.feed(text, request.num_output_tokens)
        if state.matcher.stopped:
            if not request.is_finished:
                self.scheduler.finish(request, RequestStatus.FINISHED_STOPPED)
            request.status = RequestStatus.FINISHED_STOPPED
            request.stop_reason = state.matcher.stop_str
        elif request.is_finished:
            out += state.matcher.flush()
        return out

    def _forget(self, request_id: str) -> None:
        self.runner.release(request_id)
        self._text.pop(request_id, None)

    def _delta(
        self, request: Request, new_ids: list[int], logprobs: list[Any] | None = None, text: str | None = None
    ) -> RequestOutputDelta:
        return RequestOutputDelta(
            request.request_id,
            new_ids,
            logprobs,
            request.finish_reason,
            request.num_prompt_tokens,
            request.num_output_tokens,
            request.stop_reason if request.status == RequestStatus.FINISHED_STOPPED else None,
            text,
        )

    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(
            num_running=len(s.running),
            num_waiting=len(s.waiting),
            used_kv_blocks=s.blocks.num_used_blocks,
            total_kv_blocks=s.blocks.num_blocks,
            used_state_slots=s.slots.num_used_slots,
            total_state_slots=s.slots.num_slots,
            num_preemptions=s.num_preemptions,
            max_model_len=self.max_model_len,
        )


@dataclass(slots=True)
class _TextState:
    detok: IncrementalDetokenizer
    matcher: StopStringMatcher


def read_max_position_embeddings(path: str | Path) -> int:
    """The context length in the checkpoint's config.json (text_config's for multimodal checkpoints)."""
    config_file = Path(path) / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {config_file}: {exc}") from exc
    value = (config.get("text_config") or {}).get("max_position_embeddings", config.get("max_position_embeddings"))
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{config_file} has no usable max_position_embeddings (got {value!r})")
    return value

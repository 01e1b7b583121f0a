"""Turns a `ScheduledBatch` into a `ForwardBatch`, runs the model on it and samples on the device.

The runner owns everything with tensors in it: the cache tensors (allocated through `model.allocate_cache` from a
`CachePlan`, plus one null KV block that padded decode rows write to), the per-request random generators, and on a
GPU the static buffers and CUDA graphs of decode steps (`cuda_graphs.py`; `enforce_eager` runs the same padded
decode without graphs). The batch is built on the host as flat Python lists, one entry per scheduled request, and
copied to the device once. Positions are `[3, N]` MRoPE rows: all equal to the token
index for text, sliced from the request's precomputed rows when it carries images.

Images and videos: the first step that schedules a chunk holding a request's placeholder tokens runs the vision
tower once over all of that request's media (every such request of the step in one call) and keeps the feature
rows, keyed by request id; each chunk then takes the rows of its own placeholders (`feature_slice`, offset into
the flat batch). The rows are dropped as soon as the prefill has passed the last placeholder, and when the
request finishes, is aborted or is preempted; a recompute after preemption simply encodes again.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, replace
from typing import Any

import torch

from fp4serve.engine.batch import ForwardBatch, ModelCache
from fp4serve.engine.cuda_graphs import DecodeGraphs, DecodeRows
from fp4serve.engine.kv_cache import blocks_needed, token_slots
from fp4serve.engine.memory import CachePlan
from fp4serve.engine.request import Request
from fp4serve.engine.scheduler import ScheduledBatch
from fp4serve.sampling import Sampler, SamplerOutput, SamplingParams, make_generator

logger = logging.getLogger(__name__)

# patch rows per vision-tower call: one image at Qwen3.5's largest size (16.7M pixels); also what the GPU profile runs
ENCODER_BATCH_PATCHES = 65536


@dataclass(frozen=True, slots=True)
class StepOutput:
    token_ids: dict[str, int]  # request id -> sampled token, for the entries that sample
    logprobs: dict[str, Any]  # request id -> the sampler's logprobs entry, for requests that asked for them


def _token_positions(request: Request, start: int, end: int) -> list[list[int]]:
    if request.mm_inputs is None:
        row = list(range(start, end))
        return [row, row, row]
    return request.mm_inputs.positions_for(start, end).tolist()


def _has_media(request: Request) -> bool:
    return request.mm_inputs is not None and bool(request.mm_inputs.items)


def _placeholders_in(request: Request, start: int, end: int) -> bool:
    """Whether prompt tokens start..end−1 of the request hold image/video placeholders."""
    positions = request.mm_inputs.mm_token_positions
    return bool(positions.numel()) and start <= int(positions[-1]) and end > int(positions[0])


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """Logprob of one sampled token plus the most likely alternatives (as many as the request asked for)."""

    token_id: int
    logprob: float
    rank: int  # 1 = the most likely token
    top_token_ids: list[int]  # most likely first
    top_logprobs: list[float]


def _logprobs(requests: list[Request], out: SamplerOutput) -> dict[str, TokenLogprobs]:
    if out.logprobs is None:
        return {}
    rows = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
    token_ids, logprobs, ranks = out.token_ids.tolist(), out.logprobs.tolist(), out.ranks.tolist()
    top_ids, top_lps = out.top_token_ids.tolist(), out.top_logprobs.tolist()
    result = {}
    for i in rows:
        k = requests[i].params.logprobs
        result[requests[i].request_id] = TokenLogprobs(
            token_ids[i], logprobs[i], ranks[i], top_ids[i][:k], top_lps[i][:k]
        )
    return result


class ModelRunner:
    def __init__(
        self,
        model: Any,
        *,
        device: torch.device,
        dtype: torch.dtype,
        block_size: int,
        enforce_eager: bool = True,
        seed: int = 0,
        eos_token_ids: tuple[int, ...] = (),
        vocab_size: int | None = None,
        visual: Any = None,
        encoder_batch_patches: int = ENCODER_BATCH_PATCHES,
    ) -> None:
        self.model = model
        # the vision tower (None for text-only models); feature rows of requests whose prefill still needs them
        self.visual = visual
        self.encoder_batch_patches = encoder_batch_patches
        self._mm_features: dict[str, torch.Tensor] = {}
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        # GPU decode steps replay CUDA graphs unless enforce_eager
        self.enforce_eager = enforce_eager
        self.cache: ModelCache | None = None
        self.pad_slot = 0
        self.null_block = 0
        self.decode_graphs: DecodeGraphs | None = None
        self.sampler = Sampler(eos_token_ids, vocab_size=vocab_size)
        # unseeded requests get a seed from this, so a whole run is reproducible from EngineConfig.seed
        self._seeds = random.Random(seed)
        self._generators: dict[str, torch.Generator] = {}

    def allocate_cache(self, plan: CachePlan) -> None:
        # one block past the block manager's pool: the null block that padded decode rows write to
        self.cache = self.model.allocate_cache(
            plan.num_blocks + 1, plan.block_size, plan.num_slots, self.device, self.dtype
        )
        self.pad_slot = plan.num_slots - 1
        self.null_block = plan.num_blocks
        if self.device.type == "cuda":
            self.setup_decode_graphs(plan, capture=not self.enforce_eager)

    def setup_decode_graphs(self, plan: CachePlan, *, capture: bool) -> None:
        """Run decode steps on padded static buffers, captured as CUDA graphs when `capture` (GPU only). Called
        by `allocate_cache` on a GPU; tests call it on CPU with capture=False to run the padded path there."""
        assert self.cache is not None, "allocate_cache first"
        self.decode_graphs = DecodeGraphs(
            self.model,
            self.cache,
            device=self.device,
            max_num_seqs=plan.num_slots - 1,
            max_model_len=plan.max_model_len,
            block_size=plan.block_size,
            pad_slot=self.pad_slot,
            null_block=self.null_block,
        )
        if not capture:
            return
        start = time.perf_counter()
        try:
            self.decode_graphs.capture()
        except RuntimeError as exc:
            # an op that is not capturable (a host copy on the decode path) must not take the engine down: the
            # same padded decode then runs eagerly
            self.decode_graphs.graphs.clear()
            torch.cuda.synchronize(self.device)
            logger.warning("CUDA graph capture failed, decode runs eagerly: %s", exc)
            return
        logger.info(
            "captured decode CUDA graphs for batch sizes %s in %.1f s",
            list(self.decode_graphs.buckets),
            time.perf_counter() - start,
        )

    def release(self, request_id: str) -> None:
        """Forget a finished request's random generator and any vision features it still holds."""
        self._generators.pop(request_id, None)
        self._mm_features.pop(request_id, None)

    @property
    def num_held_features(self) -> int:
        """Requests whose vision feature rows are held (for tests and stats)."""
        return len(self._mm_features)

    def encode_media(self, batch: ScheduledBatch) -> None:
        """Run the vision tower for every scheduled request that reaches its placeholders without features."""
        for request in batch.preempted:
            self._mm_features.pop(request.request_id, None)
        todo = [
            e.request
            for e in batch.entries
            if _has_media(e.request)
            and e.request.request_id not in self._mm_features
            and _placeholders_in(e.request, e.start, e.start + e.num_tokens)
        ]
        if not todo:
            return
        if self.visual is None:
            raise ValueError("this model has no vision tower, so it cannot take image or video input")
        # items are independent in the tower (attention never crosses one), so they are grouped across requests
        # into calls of at most `encoder_batch_patches` patch rows; a bigger item runs alone
        pieces: dict[str, list[torch.Tensor]] = {r.request_id: [] for r in todo}
        group: list[tuple[str, Any]] = []
        size = 0
        for request in todo:
            for item in request.mm_inputs.items:
                rows = int(item.pixel_values.shape[0])
                if group and size + rows > self.encoder_batch_patches:
                    self._encode_group(group, pieces)
                    group, size = [], 0
                group.append((request.request_id, item))
                size += rows
        self._encode_group(group, pieces)
        for request in todo:
            feats = torch.cat(pieces[request.request_id])  # [M, hidden] in placeholder order
            assert feats.shape[0] == request.mm_inputs.mm_token_positions.numel(), "one vision row per placeholder"
            self._mm_features[request.request_id] = feats

    def _encode_group(self, group: list[tuple[str, Any]], pieces: dict[str, list[torch.Tensor]]) -> None:
        param = next(self.visual.parameters())
        pixels = torch.cat([item.pixel_values for _, item in group]).to(device=param.device, dtype=param.dtype)
        feats = self.visual(pixels, [item.grid_thw for _, item in group])  # [sum of tokens, hidden]
        merge = self.visual.config.spatial_merge_size
        counts = [item.num_tokens(merge) for _, item in group]
        for (request_id, _), rows in zip(group, feats.split(counts), strict=True):
            pieces[request_id].append(rows)

    def _mm_rows(self, request: Request, start: int, end: int, offset: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(feature rows, their rows in the flat batch) for the placeholders among prompt tokens start..end−1."""
        if not _has_media(request) or not _placeholders_in(request, start, end):
            return None
        mm = request.mm_inputs
        rows, taken = mm.feature_slice(start, min(end, mm.num_tokens))
        feats = self._mm_features[request.request_id][taken]
        if end > int(mm.mm_token_positions[-1]):
            # the last placeholder runs now: later chunks and decode steps never need the features again
            del self._mm_features[request.request_id]
        return feats, rows + offset

    def prepare(self, batch: ScheduledBatch) -> ForwardBatch:
        input_ids: list[int] = []
        positions: list[list[int]] = [[], [], []]
        slots: list[int] = []
        cu_seqlens = [0]
        context_lens: list[int] = []
        query_lens: list[int] = []
        state_indices: list[int] = []
        logits_indices: list[int] = []
        tables: list[list[int]] = []
        mm_embeds: list[torch.Tensor] = []
        mm_rows: list[torch.Tensor] = []
        self.encode_media(batch)
        for entry in batch.entries:
            request, start, n = entry.request, entry.start, entry.num_tokens
            end = start + n
            mm = self._mm_rows(request, start, end, len(input_ids))
            if mm is not None:
                mm_embeds.append(mm[0])
                mm_rows.append(mm[1])
            input_ids.extend(request.token_ids[start:end])
            for row, pos in zip(positions, _token_positions(request, start, end), strict=True):
                row.extend(pos)
            slots.extend(token_slots(request.block_table, self.block_size, start, end))
            cu_seqlens.append(cu_seqlens[-1] + n)
            context_lens.append(start)
            query_lens.append(n)
            assert request.state_slot is not None
            state_indices.append(request.state_slot)
            tables.append(request.block_table[: blocks_needed(end, self.block_size)])
            if entry.sample:
                logits_indices.append(cu_seqlens[-1] - 1)
        forward_batch = self._to_device(
            input_ids, positions, slots, cu_seqlens, context_lens, query_lens, state_indices, tables, logits_indices
        )
        if not mm_embeds:
            return forward_batch
        return replace(
            forward_batch,
            mm_embeds=torch.cat(mm_embeds),
            mm_token_rows=torch.cat(mm_rows).to(self.device, non_blocking=True),
        )

    def _to_device(
        self,
        input_ids: list[int],
        positions: list[list[int]],
        slots: list[int],
        cu_seqlens: list[int],
        context_lens: list[int],
        query_lens: list[int],
        state_indices: list[int],
        tables: list[list[int]],
        logits_indices: list[int],
    ) -> ForwardBatch:
        width = max(len(t) for t in tables)
        # padding entries point at block 0; the model never reads past a sequence's seq_len
        padded = [t + [0] * (width - len(t)) for t in tables]
        seq_lens = [c + q for c, q in zip(context_lens, query_lens, strict=True)]

        def dev(values: list[int] | list[list[int]], dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

        return ForwardBatch(
            input_ids=dev(input_ids, torch.int64),
            positions=dev(positions, torch.int64),
            cu_seqlens=dev(cu_seqlens, torch.int32),
            context_lens=dev(context_lens, torch.int32),
            seq_lens=dev(seq_lens, torch.int32),
            slot_mapping=dev(slots, torch.int64),
            block_tables=dev(padded, torch.int32),
            state_indices=dev(state_indices, torch.int64),
            has_initial_state=dev([c > 0 for c in context_lens], torch.bool),
            logits_indices=dev(logits_indices, torch.int64),
            query_lens=tuple(query_lens),
            context_lens_host=tuple(context_lens),
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
        )

    def _decode_rows(self, batch: ScheduledBatch) -> DecodeRows | None:
        """The step as padded-decode input (one token per request, no media rows), or None for the plain path."""
        graphs = self.decode_graphs
        entries = batch.entries
        if graphs is None or len(entries) > graphs.buckets[-1] or any(e.num_tokens != 1 for e in entries):
            return None
        if any(_has_media(e.request) and _placeholders_in(e.request, e.start, e.start + 1) for e in entries):
            return None
        positions: list[list[int]] = [[], [], []]
        for e in entries:
            for row, pos in zip(positions, _token_positions(e.request, e.start, e.start + 1), strict=True):
                row.extend(pos)
        return DecodeRows(
            input_ids=[e.request.token_ids[e.start] for e in entries],
            positions=positions,
            slots=[token_slots(e.request.block_table, self.block_size, e.start, e.start + 1)[0] for e in entries],
            context_lens=[e.start for e in entries],
            state_indices=[e.request.state_slot for e in entries],
            tables=[e.request.block_table[: blocks_needed(e.start + 1, self.block_size)] for e in entries],
        )

    def _forward(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states, rows to sample; None = every row) of the step."""
        self.encode_media(batch)
        rows = self._decode_rows(batch)
        if rows is None:
            forward_batch = self.prepare(batch)
            return self.model.forward(forward_batch, self.cache), forward_batch.logits_indices
        assert self.decode_graphs is not None
        hidden = self.decode_graphs.forward(rows)  # [B, hidden]
        sample = [i for i, e in enumerate(batch.entries) if e.sample]
        if len(sample) == len(batch.entries):
            return hidden, None
        return hidden, torch.tensor(sample, dtype=torch.int64).to(self.device, non_blocking=True)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> StepOutput:
        assert self.cache is not None, "allocate_cache first"
        hidden, rows = self._forward(batch)  # [N, hidden]
        requests = [e.request for e in batch.entries if e.sample]
        if not requests:
            return StepOutput({}, {})
        logits = self.model.compute_logits(hidden if rows is None else hidden[rows])  # [R, V]
        out = self.sampler.sample(
            logits,
            [r.params for r in requests],
            [r.prompt_token_ids for r in requests],
            [r.output_token_ids for r in requests],
            [None if r.params.is_greedy else self._generator(r) for r in requests],
        )
        token_ids = out.token_ids.tolist()
        return StepOutput({r.request_id: t for r, t in zip(requests, token_ids, strict=True)}, _logprobs(requests, out))

    def _generator(self, request: Request) -> torch.Generator:
        gen = self._generators.get(request.request_id)
        if gen is None:
            seed = request.params.seed
            gen = make_generator(self._seeds.getrandbits(63) if seed is None else seed, self.device)
            self._generators[request.request_id] = gen
        return gen

    @torch.inference_mode()
    def profile_run(self, num_tokens: int, num_seqs: int) -> int:
        """One forward of `num_tokens` new tokens over `num_seqs` fresh sequences plus their logits: the peak.

        Returns the bytes of the scratch cache it allocated, which the caller leaves out of the activation peak. All
        sequences share one DeltaNet state slot (their final states overwrite each other; nobody reads them), so the
        profile does not hold max_num_seqs states (151 MB each for 27B) that the real cache allocates again.
        """
        num_seqs = max(1, min(num_seqs, num_tokens))
        lens = [num_tokens // num_seqs + (i < num_tokens % num_seqs) for i in range(num_seqs)]
        bs = self.block_size
        cache = self.model.allocate_cache(sum(blocks_needed(n, bs) for n in lens), bs, 1, self.device, self.dtype)
        cache_bytes = _cache_bytes(cache)
        tables, slots, next_block = [], [], 0
        for n in lens:
            table = list(range(next_block, next_block + blocks_needed(n, bs)))
            next_block += len(table)
            tables.append(table)
            slots.extend(token_slots(table, bs, 0, n))
        cu = [0]
        for n in lens:
            cu.append(cu[-1] + n)
        row = [p for n in lens for p in range(n)]
        batch = self._to_device(
            [0] * num_tokens,
            [row, row, row],
            slots,
            cu,
            [0] * num_seqs,
            lens,
            [0] * num_seqs,
            tables,
            [c - 1 for c in cu[1:]],
        )
        hidden = self.model.forward(batch, cache)
        logits = self.model.compute_logits(hidden[batch.logits_indices])
        # the sampler's worst case: every row random with top-k and top-p (a full sort of the vocabulary)
        params = [SamplingParams(temperature=1.0, top_p=0.9, top_k=20)] * num_seqs
        self.sampler.sample(logits, params, [[0]] * num_seqs, [[]] * num_seqs)
        del cache, hidden, logits
        if self.visual is not None:
            self.profile_encoder()
        return cache_bytes

    @torch.inference_mode()
    def decode_activation_bytes(self, num_seqs: int) -> int:
        """Activation peak of one decode-shaped forward of `num_seqs` sequences, its cache excluded.

        The CUDA graphs of decode steps keep this much in their private memory pool for as long as they live (the
        largest bucket's; smaller buckets reuse the pool), so the memory planner reserves it next to the cache.
        """
        n, bs = max(1, num_seqs), self.block_size
        cache = self.model.allocate_cache(n, bs, 1, self.device, self.dtype)
        batch = self._to_device(
            [0] * n,
            [[0] * n] * 3,
            [i * bs for i in range(n)],
            list(range(n + 1)),
            [0] * n,
            [1] * n,
            [0] * n,
            [[i] for i in range(n)],
            list(range(n)),
        )
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        hidden = self.model.forward(batch, cache)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - before
        del cache, hidden, batch
        torch.cuda.empty_cache()
        return max(0, int(peak))

    @torch.inference_mode()
    def profile_encoder(self) -> None:
        """One vision-tower call at the group budget: a square image of `encoder_batch_patches` patches."""
        cfg = self.visual.config
        merge = cfg.spatial_merge_size
        side = max(merge, int(self.encoder_batch_patches**0.5) // merge * merge)
        param = next(self.visual.parameters())
        pixels = torch.zeros(side * side, cfg.patch_dim, device=param.device, dtype=param.dtype)
        feats = self.visual(pixels, [(1, side, side)])
        del pixels, feats


def _cache_bytes(cache: ModelCache) -> int:
    tensors = [x for group in (cache.kv, cache.conv, cache.ssm) for x in group if x is not None]
    return sum(x.numel() * x.element_size() for x in tensors)

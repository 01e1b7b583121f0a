"""Decode steps on static, padded input buffers, replayed as CUDA graphs (one graph per batch-size bucket).

A decode step launches hundreds of small kernels (64 layers of norms, projections, conv, recurrence, attention);
at batch 1 their launch overhead alone is several milliseconds. A CUDA graph records the whole forward once per
batch size and replays it with one launch. Replay needs fixed shapes and fixed addresses, so:

- the step's inputs live in static buffers owned here (never in the model), sized for the largest bucket; each
  step copies its host-side lists into them;
- a batch of B sequences runs as the smallest bucket b >= B (1, 2, 4, 8, then multiples of 8 up to
  `max_num_seqs`); the b - B padding rows are fresh one-token sequences that write only places nobody reads: the
  spare DeltaNet state slot (`pad_slot`, never given to a request) and the null KV block (`null_block`, one block
  past the block manager's pool);
- block tables are as wide as `max_model_len` needs, so the attention kernel's split count (a function of the
  batch size and the table width) is the same at capture and at every replay;
- the forward never reads lengths back from the device on the decode path (the ops check `is_decode_only` and
  shapes only), so it can be captured.

Padded static buffers are used for every decode step on a GPU, with or without graphs (`capture=False`, the
`--enforce-eager` setting, runs the same padded forward eagerly). The kernels then see the same shapes either way,
so eager and graph decode give bit-identical results; eager stays the ground truth that graphs are tested against.
Sampling stays outside the graph: the runner takes the hidden rows of the real sequences and samples as usual.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from fp4serve.engine.batch import ForwardBatch, ModelCache
from fp4serve.engine.kv_cache import blocks_needed


def graph_buckets(max_num_seqs: int) -> tuple[int, ...]:
    """Batch sizes that get a graph: 1, 2, 4, 8, 16, 24, ... (multiples of 8), and `max_num_seqs` itself."""
    assert max_num_seqs > 0
    sizes = {b for b in (1, 2, 4) if b < max_num_seqs} | set(range(8, max_num_seqs, 8)) | {max_num_seqs}
    return tuple(sorted(sizes))


@dataclass(frozen=True, slots=True)
class DecodeRows:
    """Host-side inputs of one decode step: one new token per sequence."""

    input_ids: list[int]
    positions: list[list[int]]  # [3][B] MRoPE rows
    slots: list[int]  # KV slot of each new token
    context_lens: list[int]
    state_indices: list[int]
    tables: list[list[int]]  # block table of each sequence (at least the blocks covering its tokens)

    @property
    def num_seqs(self) -> int:
        return len(self.input_ids)


class DecodeGraphs:
    """Static decode buffers for up to `max_num_seqs` sequences, plus one captured graph per bucket."""

    def __init__(
        self,
        model: Any,
        cache: ModelCache,
        *,
        device: torch.device,
        max_num_seqs: int,
        max_model_len: int,
        block_size: int,
        pad_slot: int,
        null_block: int,
    ) -> None:
        self.model = model
        self.cache = cache
        self.device = device
        self.buckets = graph_buckets(max_num_seqs)
        self.max_model_len = max_model_len
        self.pad_slot = pad_slot
        self.null_block = null_block
        self.null_slot = null_block * block_size
        # decode steps run on the buffers, and how many of them replayed a graph
        self.num_steps = 0
        self.num_replays = 0
        size = self.buckets[-1]
        width = blocks_needed(max_model_len, block_size)

        def buffer(shape: tuple[int, ...], dtype: torch.dtype, fill: int) -> torch.Tensor:
            return torch.full(shape, fill, dtype=dtype, device=device)

        self.input_ids = buffer((size,), torch.int64, 0)
        self.positions = buffer((3, size), torch.int64, 0)
        self.cu_seqlens = torch.arange(size + 1, dtype=torch.int32, device=device)
        self.context_lens = buffer((size,), torch.int32, 0)
        self.seq_lens = buffer((size,), torch.int32, 1)
        self.slot_mapping = buffer((size,), torch.int64, self.null_slot)
        self.block_tables = buffer((size, width), torch.int32, null_block)
        self.state_indices = buffer((size,), torch.int64, pad_slot)
        self.has_initial_state = buffer((size,), torch.bool, 0)
        self.logits_indices = torch.arange(size, dtype=torch.int64, device=device)
        # bucket -> (graph, its output hidden states [b, hidden]); empty while running eagerly
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def bucket(self, num_seqs: int) -> int | None:
        """The padded batch size for `num_seqs` sequences (None: more than the buffers hold)."""
        return next((b for b in self.buckets if b >= num_seqs), None)

    def static_batch(self, b: int) -> ForwardBatch:
        """The batch of bucket `b` as views of the static buffers (host-side fields as captured)."""
        return ForwardBatch(
            input_ids=self.input_ids[:b],
            positions=self.positions[:, :b],
            cu_seqlens=self.cu_seqlens[: b + 1],
            context_lens=self.context_lens[:b],
            seq_lens=self.seq_lens[:b],
            slot_mapping=self.slot_mapping[:b],
            block_tables=self.block_tables[:b],
            state_indices=self.state_indices[:b],
            has_initial_state=self.has_initial_state[:b],
            logits_indices=self.logits_indices[:b],
            query_lens=(1,) * b,
            context_lens_host=(0,) * b,
            max_query_len=1,
            max_seq_len=self.max_model_len,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Record one graph per bucket, largest first, all in one memory pool (CUDA only)."""
        pool = torch.cuda.graph_pool_handle()
        for b in reversed(self.buckets):
            batch = self.static_batch(b)
            # warm-up outside capture: compiles this shape's kernels and repacks NVFP4 weights on first use; the
            # padding rows it runs touch only the spare state slot and the null KV block
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                self.model.forward(batch, self.cache)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden = self.model.forward(batch, self.cache)
            self.graphs[b] = (graph, hidden)
        torch.cuda.synchronize(self.device)

    def forward(self, rows: DecodeRows) -> torch.Tensor:
        """Hidden states [B, hidden] of the real rows of a decode step (graph replay when captured)."""
        n = rows.num_seqs
        b = self.bucket(n)
        assert b is not None, f"{n} sequences exceed the decode buffers ({self.buckets[-1]})"
        self._fill(rows, b)
        self.num_steps += 1
        captured = self.graphs.get(b)
        if captured is not None:
            graph, hidden = captured
            graph.replay()
            self.num_replays += 1
            return hidden[:n]
        pad = b - n
        batch = replace(
            self.static_batch(b),
            context_lens_host=tuple(rows.context_lens) + (0,) * pad,
            max_seq_len=max(rows.context_lens) + 1,
        )
        return self.model.forward(batch, self.cache)[:n]

    def _fill(self, rows: DecodeRows, b: int) -> None:
        pad = b - rows.num_seqs
        width = max(len(t) for t in rows.tables)
        null = self.null_block
        # every row's unused table entries, and the padding rows' whole tables, point at the null block
        tables = [t + [null] * (width - len(t)) for t in rows.tables] + [[null] * width] * pad
        context = rows.context_lens + [0] * pad

        def put(dst: torch.Tensor, values: list, dtype: torch.dtype) -> None:
            dst.copy_(torch.tensor(values, dtype=dtype), non_blocking=True)

        put(self.input_ids[:b], rows.input_ids + [0] * pad, torch.int64)
        put(self.positions[:, :b], [p + [0] * pad for p in rows.positions], torch.int64)
        put(self.context_lens[:b], context, torch.int32)
        put(self.seq_lens[:b], [c + 1 for c in context], torch.int32)
        put(self.slot_mapping[:b], rows.slots + [self.null_slot] * pad, torch.int64)
        put(self.block_tables[:b, :width], tables, torch.int32)
        put(self.state_indices[:b], rows.state_indices + [self.pad_slot] * pad, torch.int64)
        put(self.has_initial_state[:b], [c > 0 for c in context], torch.bool)

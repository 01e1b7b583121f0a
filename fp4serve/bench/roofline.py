"""Floors for each measurement: the device's measured ceilings, and the bytes and FLOPs a step must move.

Two ceilings are measured on the device itself, not taken from a datasheet: copy bandwidth (a large
device-to-device copy, counting bytes read plus bytes written) and matmul rate (a large square product in the
model dtype). A model's `Footprint` then says what one step must touch at the least: a decode step reads every
weight once (the embedding only for the batch's rows), reads and writes each sequence's DeltaNet state (conv and
float32 recurrent state), and reads each sequence's K/V up to its context; a prefill does 2 FLOPs per weight per
token plus causal attention and the delta-rule state math, and reads the weights once per forward. The floor time
is the larger of bytes / bandwidth and FLOPs / rate; a result's fraction of the floor is how close to it we are.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fp4serve.model.config import Qwen35TextConfig
from fp4serve.model.linear import NVFP4Linear


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: torch.device, *, warmup: int, iters: int) -> list[float]:
    """Seconds per call of `fn`, each timed alone (CUDA events on a GPU, the host clock after a sync elsewhere)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


@dataclass(frozen=True)
class Ceilings:
    copy_bytes_per_s: float  # bytes read + written per second by a device-to-device copy
    matmul_flops_per_s: float  # a square matmul in the model dtype
    copy_buffer_bytes: int
    matmul_size: int
    matmul_dtype: str


def measure_ceilings(device: torch.device, dtype: torch.dtype, *, copy_bytes: int, matmul_size: int) -> Ceilings:
    gen = torch.Generator(device=device).manual_seed(1234)
    copy_s = statistics.median(_copy_times(device, copy_bytes, gen))
    matmul_s = statistics.median(_matmul_times(device, dtype, matmul_size, gen))
    return Ceilings(
        copy_bytes_per_s=2 * copy_bytes / copy_s,
        matmul_flops_per_s=2 * matmul_size**3 / matmul_s,
        copy_buffer_bytes=copy_bytes,
        matmul_size=matmul_size,
        matmul_dtype=str(dtype).removeprefix("torch."),
    )


def _copy_times(device: torch.device, nbytes: int, gen: torch.Generator) -> list[float]:
    # random bytes, never zeros: some memory systems compress zeros
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device, generator=gen)
    dst = torch.empty_like(src)
    return time_calls(lambda: dst.copy_(src), device, warmup=3, iters=15)


def _matmul_times(device: torch.device, dtype: torch.dtype, n: int, gen: torch.Generator) -> list[float]:
    # two operand sets, alternated, so that repeated runs are not served from cache
    operands = [[torch.randn(n, n, device=device, generator=gen).to(dtype) for _ in range(2)] for _ in range(2)]
    turn = itertools.count()

    def matmul() -> None:
        a, b = operands[next(turn) % 2]
        torch.mm(a, b)

    return time_calls(matmul, device, warmup=3, iters=10)


@dataclass(frozen=True)
class Footprint:
    """What a model must move and compute per step, from its tensors and its config."""

    weight_bytes: int  # every parameter and buffer
    embedding_bytes: int  # the input embedding table (a decode step reads only the batch's rows)
    embedding_row_bytes: int
    matmul_params: int  # weights of the projections run on every token (not the lm_head)
    lm_head_params: int
    state_bytes_per_seq: int  # DeltaNet conv + recurrent state of one sequence
    kv_bytes_per_token: int
    num_full_layers: int
    num_linear_layers: int
    num_heads: int
    head_dim: int
    gdn_value_heads: int
    gdn_key_dim: int
    gdn_value_dim: int


def footprint(
    model: nn.Module, config: Qwen35TextConfig, *, state_bytes_per_seq: int, kv_bytes_per_token: int
) -> Footprint:
    """Counts from the model's own modules; works for ours and for transformers' (same module names)."""
    weight_bytes = sum(t.nbytes for t in model.parameters()) + sum(t.nbytes for t in model.buffers())
    embedding_bytes = row_bytes = matmul = lm_head = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            embedding_bytes += module.weight.nbytes
            row_bytes += module.weight.shape[1] * module.weight.element_size()
        elif isinstance(module, NVFP4Linear | nn.Linear):
            params = module.in_features * module.out_features
            if name.rsplit(".", 1)[-1] == "lm_head":
                lm_head += params
            else:
                matmul += params
    if config.tie_word_embeddings:
        lm_head = config.vocab_size * config.hidden_size
    num_full = sum(config.is_full_attention(i) for i in range(config.num_hidden_layers))
    return Footprint(
        weight_bytes=weight_bytes,
        embedding_bytes=0 if config.tie_word_embeddings else embedding_bytes,
        embedding_row_bytes=row_bytes,
        matmul_params=matmul,
        lm_head_params=lm_head,
        state_bytes_per_seq=state_bytes_per_seq,
        kv_bytes_per_token=kv_bytes_per_token,
        num_full_layers=num_full,
        num_linear_layers=config.num_hidden_layers - num_full,
        num_heads=config.num_attention_heads,
        head_dim=config.head_dim,
        gdn_value_heads=config.linear_num_value_heads,
        gdn_key_dim=config.linear_key_head_dim,
        gdn_value_dim=config.linear_value_head_dim,
    )


@dataclass(frozen=True)
class Floor:
    bytes: float
    flops: float
    seconds: float
    bound: str  # "memory" or "compute": which term sets the floor


def decode_floor(fp: Footprint, ceilings: Ceilings, *, batch: int, context_len: int) -> Floor:
    """One decode step of `batch` sequences that each have `context_len` tokens cached."""
    weights = fp.weight_bytes - fp.embedding_bytes + batch * fp.embedding_row_bytes
    state = 2 * batch * fp.state_bytes_per_seq  # read and written
    kv = batch * (context_len + 1) * fp.kv_bytes_per_token
    flops = batch * (2 * (fp.matmul_params + fp.lm_head_params) + _mixer_flops_per_token(fp, context_len))
    return _floor(weights + state + kv, flops, ceilings)


def prefill_floor(fp: Footprint, ceilings: Ceilings, *, prompt_lens: list[int], num_forwards: int) -> Floor:
    """Prefill of fresh prompts of these lengths in `num_forwards` engine steps (each reads the weights once)."""
    tokens = sum(prompt_lens)
    attention = sum(4 * fp.num_heads * fp.head_dim * n * (n + 1) // 2 for n in prompt_lens) * fp.num_full_layers
    flops = 2 * fp.matmul_params * tokens + 2 * fp.lm_head_params * len(prompt_lens) + attention
    flops += tokens * _gdn_flops_per_token(fp)
    weights = (fp.weight_bytes - fp.embedding_bytes) * num_forwards + tokens * fp.embedding_row_bytes
    state = len(prompt_lens) * fp.state_bytes_per_seq
    kv = tokens * fp.kv_bytes_per_token
    return _floor(weights + state + kv, flops, ceilings)


def _gdn_flops_per_token(fp: Footprint) -> int:
    # per value head: k^T S, the rank-1 update and q^T S, each K*V multiply-adds (the decay is a further K*V)
    return fp.num_linear_layers * fp.gdn_value_heads * 6 * fp.gdn_key_dim * fp.gdn_value_dim


def _mixer_flops_per_token(fp: Footprint, context_len: int) -> int:
    attention = fp.num_full_layers * 4 * fp.num_heads * fp.head_dim * (context_len + 1)
    return attention + _gdn_flops_per_token(fp)


def _floor(nbytes: float, flops: float, ceilings: Ceilings) -> Floor:
    memory_s = nbytes / ceilings.copy_bytes_per_s
    compute_s = flops / ceilings.matmul_flops_per_s
    seconds = max(memory_s, compute_s)
    assert seconds > 0 and math.isfinite(seconds)
    return Floor(nbytes, flops, seconds, "memory" if memory_s >= compute_s else "compute")

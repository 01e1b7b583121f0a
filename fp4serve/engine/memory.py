"""Cache sizing: how many KV blocks and which `max_model_len` a memory budget allows, as vLLM decides it.

The budget comes from one of two places. On a GPU, `gpu_memory_utilization` F is this instance's share of the
card's total memory for everything it holds: the cache gets F * total minus the weights and the activation peak
(measured by a profile forward of `max_num_batched_tokens` tokens) minus memory allocated outside PyTorch during
startup. On CPU, or when given, `kv_cache_memory_bytes` is the budget itself. The cache then holds one DeltaNet
state slot per possible running sequence (plus a spare for padded rows) and as many KV blocks as the rest allows.
`max_model_len` -1 starts from the model's `max_position_embeddings` and is cut to the largest length whose cache
for one full sequence fits; an explicit length that does not fit is an error naming the largest that would. The
planning itself is a pure function, so it is tested on CPU with made-up byte counts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fp4serve.config import AUTO_MAX_MODEL_LEN
from fp4serve.engine.kv_cache import blocks_needed

logger = logging.getLogger(__name__)

_HINT = "raise gpu_memory_utilization (GPU) or kv_cache_memory_bytes (CPU), or lower max_num_seqs"


def format_bytes(n: int | float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class CachePlan:
    num_blocks: int
    block_size: int
    num_slots: int  # state slots allocated: max_num_seqs plus one spare (index max_num_seqs) for padded rows
    max_model_len: int
    kv_bytes: int
    state_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.kv_bytes + self.state_bytes


def plan_cache(
    *,
    budget_bytes: int,
    kv_bytes_per_token: int,
    state_bytes_per_slot: int,
    block_size: int,
    max_num_seqs: int,
    max_model_len: int | None,
    max_position_embeddings: int,
) -> CachePlan:
    """Split a cache budget into state slots and KV blocks, and settle max_model_len (None: the model's length)."""
    assert kv_bytes_per_token > 0 and block_size > 0
    num_slots = max_num_seqs + 1
    state_bytes = state_bytes_per_slot * num_slots
    block_bytes = kv_bytes_per_token * block_size
    num_blocks = max(0, (budget_bytes - state_bytes) // block_bytes)
    fit_len = num_blocks * block_size
    if max_model_len == AUTO_MAX_MODEL_LEN and fit_len < max_position_embeddings and state_bytes_per_slot:
        # like vLLM, where DeltaNet state and KV share one pool and concurrency is whatever fits: keep the model's full
        # context when fewer concurrent sequences make room for it, rather than cutting the context to the bone
        full_kv = blocks_needed(max_position_embeddings, block_size) * block_bytes
        seqs = min(max_num_seqs, (budget_bytes - full_kv) // state_bytes_per_slot - 1)
        if seqs >= 1:
            logger.warning(
                "Auto-fit: max_num_seqs reduced from %d to %d so that the full %d-token context fits",
                max_num_seqs,
                seqs,
                max_position_embeddings,
            )
            max_num_seqs = int(seqs)
            num_slots = max_num_seqs + 1
            state_bytes = state_bytes_per_slot * num_slots
            num_blocks = max(0, (budget_bytes - state_bytes) // block_bytes)
            fit_len = num_blocks * block_size
    if num_blocks == 0:
        raise ValueError(
            f"cache budget of {format_bytes(budget_bytes)} is too small: the DeltaNet state of "
            f"max_num_seqs={max_num_seqs} sequences takes {format_bytes(state_bytes)}, leaving no room for even one KV "
            f"block of {block_size} tokens ({format_bytes(block_bytes)}); {_HINT}"
        )
    if max_model_len == AUTO_MAX_MODEL_LEN:
        length = min(max_position_embeddings, fit_len)
        if length < max_position_embeddings:
            logger.warning("Auto-fit max_model_len: reduced from %d to %d", max_position_embeddings, length)
        else:
            logger.info("Auto-fit max_model_len: the full %d tokens fit", length)
    else:
        length = max_position_embeddings if max_model_len is None else max_model_len
        if length > max_position_embeddings:
            raise ValueError(
                f"max_model_len={length} is longer than the model's max_position_embeddings={max_position_embeddings}"
            )
        if length > fit_len:
            need = blocks_needed(length, block_size) * block_bytes
            seqs = (budget_bytes - need) // state_bytes_per_slot - 1 if state_bytes_per_slot else 0
            fewer_seqs = f" (or lower max_num_seqs to at most {seqs})" if 0 < seqs < max_num_seqs else ""
            raise ValueError(
                f"max_model_len={length} needs {format_bytes(need)} of KV cache for one sequence, but the cache budget "
                f"of {format_bytes(budget_bytes)} leaves {format_bytes(num_blocks * block_bytes)} for KV after the "
                f"DeltaNet state of max_num_seqs={max_num_seqs} sequences ({format_bytes(state_bytes)}); the largest "
                f"max_model_len that fits is {fit_len}. Set max_model_len to at most {fit_len}{fewer_seqs}, use -1 "
                f"to fit it automatically, or {_HINT}"
            )
    # more blocks than max_num_seqs full-length sequences can hold would never be used
    num_blocks = min(num_blocks, max_num_seqs * blocks_needed(length, block_size))
    logger.info(
        "KV cache: %d tokens, %.1f full-length (%d-token) sequences at once; DeltaNet state: %d slots, %s",
        num_blocks * block_size,
        num_blocks * block_size / length,
        length,
        num_slots,
        format_bytes(state_bytes),
    )
    return CachePlan(num_blocks, block_size, num_slots, length, num_blocks * block_bytes, state_bytes)


@dataclass(frozen=True)
class MemorySnapshot:
    """GPU memory as seen before the model loads, the baseline for what this instance adds."""

    free_bytes: int
    total_bytes: int
    torch_reserved_bytes: int

    @classmethod
    def take(cls, device: torch.device) -> MemorySnapshot:
        torch.cuda.synchronize(device)
        free, total = torch.cuda.mem_get_info(device)
        return cls(free, total, torch.cuda.memory_reserved(device))


def gpu_cache_budget(
    device: torch.device, utilization: float, baseline: MemorySnapshot, profile: Callable[[], int | None]
) -> int:
    """Bytes left for the cache: utilization * total - (weights + activation peak) - non-torch startup memory."""
    requested = utilization * baseline.total_bytes
    if baseline.free_bytes < requested:
        raise ValueError(
            f"free GPU memory at startup ({format_bytes(baseline.free_bytes)} of {format_bytes(baseline.total_bytes)}) "
            f"is less than gpu_memory_utilization={utilization} asks for ({format_bytes(requested)}); lower "
            "gpu_memory_utilization or free memory used by other processes"
        )
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    # the profile's own scratch cache is not activation memory: the real cache is planned from the budget
    scratch = profile() or 0
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - scratch
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    reserved = torch.cuda.memory_reserved(device)
    # memory taken since the baseline that PyTorch's allocator does not account for (CUDA context, cuBLAS, NCCL)
    non_torch = max(0, (baseline.free_bytes - free) - (reserved - baseline.torch_reserved_bytes))
    budget = int(requested - peak - non_torch)
    logger.info(
        "memory: %s requested (%.2f of %s); weights + activation peak %s; non-torch %s; cache budget %s",
        format_bytes(requested),
        utilization,
        format_bytes(baseline.total_bytes),
        format_bytes(peak),
        format_bytes(non_torch),
        format_bytes(budget),
    )
    if budget <= 0:
        raise ValueError(
            f"no GPU memory left for the cache: weights and activations take {format_bytes(peak + non_torch)} of the "
            f"{format_bytes(requested)} that gpu_memory_utilization={utilization} allows; raise it or lower "
            "max_num_batched_tokens"
        )
    return budget

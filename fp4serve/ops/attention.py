"""Causal GQA attention over the paged KV cache, for prefill, chunked prefill and decode alike.

The cache of one layer is [2, num_blocks, block_size, Hkv, D] (K then V). `store_kv` writes the new tokens' K/V at
their `slot_mapping` slots first; `paged_attention` then reads each sequence's whole history (cached context plus
the new tokens) through its `block_tables` row, so the same call serves a fresh prompt, a prompt chunk that follows
cached context, and a one-token decode step. Query row `i` of sequence `b` sits at absolute position
`seq_lens[b] - query_len_b + i` and sees keys up to and including that position. Query head h reads KV head
`h // (H / Hkv)`. Scores and softmax are float32.

On CUDA, a batch with one query per sequence (decode: every scheduled sequence has at least one new token, so
`N == B` means all query lengths are 1) runs `fp4serve.ops.triton.paged_attention`'s split-context kernel. Its
split count depends only on shapes (the batch size and the block table's width), never on lengths read back from
the device, so a decode step is sync-free and can be captured in a CUDA graph. Other batches (prefill, chunked
prefill, mixed) gather each sequence's K/V and call PyTorch's fused SDPA, one call per sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fp4serve.ops.backend import is_power_of_two, use_kernels


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write k, v [N, Hkv, D] into kv_cache [2, num_blocks, block_size, Hkv, D] at flat slots slot_mapping [N]."""
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
    flat = kv_cache.view(2, num_blocks * block_size, num_kv_heads, head_dim)
    flat[0].index_copy_(0, slot_mapping, k.to(kv_cache.dtype))
    flat[1].index_copy_(0, slot_mapping, v.to(kv_cache.dtype))


def paged_attention_ref(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    cu_seqlens: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q [N, H, D] (new tokens, flat varlen) → o [N, H, D]; the new tokens' K/V must already be stored."""
    block_size = kv_cache.shape[2]
    num_heads = q.shape[1]
    dtype = torch.promote_types(q.dtype, torch.float32)
    o = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for i, seq_len in enumerate(seq_lens.tolist()):
        start, end = bounds[i], bounds[i + 1]
        blocks = block_tables[i, : (seq_len + block_size - 1) // block_size].long()
        keys = kv_cache[0, blocks].flatten(0, 1)[:seq_len].to(dtype)  # [S, Hkv, D]
        values = kv_cache[1, blocks].flatten(0, 1)[:seq_len].to(dtype)
        group = num_heads // keys.shape[1]
        keys = keys.repeat_interleave(group, dim=1).transpose(0, 1)  # [H, S, D]
        values = values.repeat_interleave(group, dim=1).transpose(0, 1)
        queries = q[start:end].to(dtype).transpose(0, 1)  # [H, L, D]
        scores = (queries @ keys.transpose(1, 2)) * scale  # [H, L, S]
        query_pos = torch.arange(seq_len - (end - start), seq_len, device=q.device)
        visible = torch.arange(seq_len, device=q.device)[None, :] <= query_pos[:, None]  # [L, S]
        probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
        o[start:end] = (probs @ values).transpose(0, 1).to(q.dtype)
    return o


def paged_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    cu_seqlens: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    if not use_kernels(q):
        return paged_attention_ref(q, kv_cache, cu_seqlens, seq_lens, block_tables, scale)
    num_seqs, head_dim = seq_lens.shape[0], q.shape[-1]
    if q.shape[0] == num_seqs and is_power_of_two(head_dim) and q.dtype == kv_cache.dtype:
        from fp4serve.ops.triton.paged_attention import paged_decode_attention

        capacity = block_tables.shape[1] * kv_cache.shape[2]  # tokens the block tables can address
        q = q if q.stride(-1) == 1 else q.contiguous()
        return paged_decode_attention(q, kv_cache, block_tables, seq_lens, scale, max_seq_len=capacity)
    return paged_attention_sdpa(q, kv_cache, cu_seqlens, seq_lens, block_tables, scale)


def paged_attention_sdpa(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    cu_seqlens: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """`paged_attention_ref` through `F.scaled_dot_product_attention`, one call per sequence (flash/efficient
    kernels on CUDA). A fresh prompt is plain causal attention; a chunk after cached context sees the context plus
    its own causal prefix (a bottom-right aligned mask)."""
    block_size, num_heads = kv_cache.shape[2], q.shape[1]
    group = num_heads // kv_cache.shape[3]
    o = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for i, seq_len in enumerate(seq_lens.tolist()):
        start, end = bounds[i], bounds[i + 1]
        length = end - start
        if length == 0:
            continue
        blocks = block_tables[i, : (seq_len + block_size - 1) // block_size].long()
        keys = kv_cache[0, blocks].flatten(0, 1)[:seq_len].to(q.dtype)  # [S, Hkv, D]
        values = kv_cache[1, blocks].flatten(0, 1)[:seq_len].to(q.dtype)
        keys = keys.repeat_interleave(group, dim=1).transpose(0, 1)[None]  # [1, H, S, D]
        values = values.repeat_interleave(group, dim=1).transpose(0, 1)[None]
        queries = q[start:end].transpose(0, 1)[None]  # [1, H, L, D]
        mask = None
        if length != seq_len:
            query_pos = torch.arange(seq_len - length, seq_len, device=q.device)
            mask = torch.arange(seq_len, device=q.device)[None, :] <= query_pos[:, None]  # [L, S]
        out = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=mask, is_causal=mask is None, scale=scale
        )  # [1, H, L, D]
        o[start:end] = out[0].transpose(0, 1)
    return o

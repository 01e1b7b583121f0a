"""Causal GQA attention over the paged KV cache, for prefill, chunked prefill and decode alike.

The cache of one layer is [2, num_blocks, block_size, Hkv, D] (K then V). `store_kv` writes the new tokens' K/V at
their `slot_mapping` slots first; `paged_attention` then reads each sequence's whole history (cached context plus
the new tokens) through its `block_tables` row, so the same call serves a fresh prompt, a prompt chunk that follows
cached context, and a one-token decode step. Query row `i` of sequence `b` sits at absolute position
`seq_lens[b] - query_len_b + i` and sees keys up to and including that position. Query head h reads KV head
`h // (H / Hkv)`. Scores and softmax are float32.
"""

from __future__ import annotations

import torch


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
    return paged_attention_ref(q, kv_cache, cu_seqlens, seq_lens, block_tables, scale)

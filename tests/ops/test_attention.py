"""Paged causal GQA attention (prefill with cached context, and decode) against dense float64 attention."""

from __future__ import annotations

import math

import pytest
import torch

from fp4serve.ops.attention import paged_attention, store_kv


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int) -> torch.Tensor:
    """q [L, H, D] at positions offset.., k/v [S, Hkv, D] → [L, H, D], one query row and head at a time."""
    group = q.shape[1] // k.shape[1]
    out = torch.zeros_like(q)
    for i in range(q.shape[0]):
        for h in range(q.shape[1]):
            keys, vals = k[: offset + i + 1, h // group], v[: offset + i + 1, h // group]
            p = torch.softmax(keys @ q[i, h] / math.sqrt(q.shape[2]), dim=0)
            out[i, h] = p @ vals
    return out


@pytest.mark.parametrize(
    "query_lens,context_lens",
    [([1], [0]), ([63], [0]), ([40, 1, 7], [0, 33, 16]), ([1, 1, 1], [5, 0, 70])],
    ids=["one-token", "prompt63", "mixed-chunked", "decode"],
)
def test_paged_attention(query_lens: list[int], context_lens: list[int]) -> None:
    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, dim, block_size, num_blocks = 6, 2, 36, 8, 40
    seq_lens = [c + q for c, q in zip(context_lens, query_lens, strict=True)]
    max_blocks = max(math.ceil(s / block_size) for s in seq_lens)
    # scattered, non-contiguous blocks per sequence
    perm = torch.randperm(num_blocks, generator=gen)
    tables = perm[: len(seq_lens) * max_blocks].view(len(seq_lens), max_blocks).to(torch.int32)
    cache = torch.randn(2, num_blocks, block_size, kv_heads, dim, generator=gen)
    full_k = [torch.randn(s, kv_heads, dim, generator=gen) for s in seq_lens]
    full_v = [torch.randn(s, kv_heads, dim, generator=gen) for s in seq_lens]
    # context tokens already in the cache
    for i, ctx in enumerate(context_lens):
        for p in range(ctx):
            blk = tables[i, p // block_size]
            cache[0, blk, p % block_size], cache[1, blk, p % block_size] = full_k[i][p], full_v[i][p]
    slots = torch.cat(
        [
            tables[i, torch.arange(c, s) // block_size].long() * block_size + torch.arange(c, s) % block_size
            for i, (c, s) in enumerate(zip(context_lens, seq_lens, strict=True))
        ]
    )
    new_k = torch.cat([full_k[i][c:] for i, c in enumerate(context_lens)])
    new_v = torch.cat([full_v[i][c:] for i, c in enumerate(context_lens)])
    store_kv(new_k, new_v, cache, slots)
    q = torch.randn(sum(query_lens), heads, dim, generator=gen)
    cu = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    out = paged_attention(q, cache, cu, torch.tensor(seq_lens, dtype=torch.int32), tables, dim**-0.5)
    for i, ctx in enumerate(context_lens):
        ref = dense_attention(q[cu[i] : cu[i + 1]].double(), full_k[i].double(), full_v[i].double(), ctx)
        torch.testing.assert_close(out[cu[i] : cu[i + 1]].double(), ref, rtol=1e-5, atol=1e-5)

"""Paged GQA decode attention (with and without context splits) vs the gather-and-softmax reference."""

from __future__ import annotations

import pytest
import torch

from fp4serve.ops.triton.paged_attention import paged_decode_attention, paged_decode_attention_ref


def _case(hq: int, hkv: int, d: int, block: int, lens: list[int], device: str, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    max_blocks = max((n + block - 1) // block for n in lens) + 1
    num_blocks = len(lens) * max_blocks + 3
    kv = torch.randn(2, num_blocks, block, hkv, d, generator=g).to(device=device, dtype=dtype)
    tables = torch.randperm(num_blocks, generator=g)[: len(lens) * max_blocks].reshape(len(lens), max_blocks)
    q = torch.randn(len(lens), hq, d, generator=g).to(device=device, dtype=dtype)
    return q, kv, tables.int().to(device), torch.tensor(lens, dtype=torch.int32, device=device)


@pytest.mark.parametrize(("lens", "splits"), [([1, 17, 40], 1), ([1, 17, 70], 4)])
def test_tiny_model_heads(lens: list[int], splits: int, device: str) -> None:
    q, kv, tables, seq_lens = _case(4, 2, 64, 16, lens, device, torch.float32, len(lens) + splits)
    ref = paged_decode_attention_ref(q, kv, tables, seq_lens, 0.125)
    out = paged_decode_attention(q, kv, tables, seq_lens, 0.125, max_seq_len=max(lens), num_splits=splits)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [None, 1, 8])
def test_gpu_27b_heads_bf16(splits: int | None) -> None:
    lens = [1, 1000, 4097, 33]
    q, kv, tables, seq_lens = _case(24, 4, 256, 16, lens, "cuda", torch.bfloat16, 5)
    ref = paged_decode_attention_ref(q, kv, tables, seq_lens, 1 / 16)
    out = paged_decode_attention(q, kv, tables, seq_lens, 1 / 16, max_seq_len=max(lens), num_splits=splits)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)

"""Paged decode attention (one new query token per sequence) for the gated full-attention layers, with GQA.

Cache layout (batch.py): kv_cache [2, num_blocks, block_size, Hkv, D]; token `t` of sequence `b` lives in block
`block_tables[b, t // block_size]` at offset `t % block_size`. The current token's K/V are already written.

One program handles one (sequence, kv head, context split): all G = Hq / Hkv query heads of that kv head share each
K/V tile it reads (read once per group, not once per query head), scores and the weighted sum go through tl.dot,
and the softmax is the online (running max / running sum) form in fp32. Flash-decoding: at batch 1 there are only
Hkv programs per sequence, far too few to pull bandwidth, so the context is split in `num_splits` pieces whose
partial results (normalized output + log-sum-exp) a second small kernel merges. Each split's range is derived from
the sequence's own length in-kernel, so a fixed `num_splits` is safe to capture in a CUDA graph.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

_LOG2E = tl.constexpr(1.4426950408889634)


def paged_decode_attention_ref(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Reference: gather each sequence's K/V, causal softmax over all its cached tokens (fp32)."""
    bsz, hq, d = q.shape
    block_size, hkv = kv_cache.shape[2], kv_cache.shape[3]
    group = hq // hkv
    out = torch.empty_like(q)
    for b in range(bsz):
        n = int(seq_lens[b])
        blocks = block_tables[b, : (n + block_size - 1) // block_size].long()
        k = kv_cache[0, blocks].reshape(-1, hkv, d)[:n].float()  # [n, Hkv, D]
        v = kv_cache[1, blocks].reshape(-1, hkv, d)[:n].float()
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        s = torch.einsum("hd,nhd->hn", q[b].float(), k) * scale
        out[b] = torch.einsum("hn,nhd->hd", s.softmax(-1), v).to(q.dtype)
    return out


@triton.jit
def _paged_decode_kernel(
    q_ptr,
    kv_ptr,
    bt_ptr,
    len_ptr,
    out_ptr,
    lse_ptr,
    scale,
    stride_qb,
    stride_qh,
    stride_kv,
    stride_blk,
    stride_tok,
    stride_kvh,
    stride_btb,
    block_size,
    D: tl.constexpr,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(len_ptr + b)
    chunk = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_T) * BLOCK_T
    t_begin = split * chunk
    t_end = tl.minimum(seq_len, t_begin + chunk)
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D)
    offs_t = tl.arange(0, BLOCK_T)
    heads = kvh * G + offs_g  # query heads of this kv head
    g_ok = offs_g < G
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=g_ok[:, None], other=0.0)
    qk_scale = scale * _LOG2E  # scores in log2 units
    m = tl.full((G_PAD,), float("-inf"), dtype=tl.float32)
    l_sum = tl.zeros((G_PAD,), dtype=tl.float32)
    acc = tl.zeros((G_PAD, D), dtype=tl.float32)
    for t0 in range(t_begin, t_end, BLOCK_T):
        t = t0 + offs_t
        t_ok = t < t_end
        blk = tl.load(bt_ptr + b * stride_btb + t // block_size, mask=t_ok, other=0).to(tl.int64)
        tok = blk * stride_blk + (t % block_size) * stride_tok + kvh * stride_kvh  # [BT]
        k = tl.load(kv_ptr + tok[:, None] + offs_d[None, :], mask=t_ok[:, None], other=0.0)  # [BT, D]
        v = tl.load(kv_ptr + stride_kv + tok[:, None] + offs_d[None, :], mask=t_ok[:, None], other=0.0)
        if DOT_FP32:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")  # [G_PAD, BT]
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(t_ok[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        if DOT_FP32:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    # an empty split (t_begin >= t_end) has l_sum = 0: output 0 and lse = -inf, which the merge weights by 0
    safe_l = tl.where(l_sum > 0, l_sum, 1.0)
    o = acc / safe_l[:, None]
    if NUM_SPLITS == 1:
        dst = out_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :]
        tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=g_ok[:, None])
    else:
        hq = tl.num_programs(1) * G
        row = (b * hq + heads) * NUM_SPLITS + split  # [G_PAD] rows of the [B, Hq, S] partials
        tl.store(out_ptr + row[:, None] * D + offs_d[None, :], o, mask=g_ok[:, None])
        lse = tl.where(l_sum > 0, m + tl.log2(safe_l), float("-inf"))
        tl.store(lse_ptr + row, lse, mask=g_ok)


@triton.jit
def _merge_splits_kernel(
    part_ptr, lse_ptr, out_ptr, stride_ob, stride_oh, HQ, D: tl.constexpr, NUM_SPLITS: tl.constexpr
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_s = tl.arange(0, NUM_SPLITS)
    offs_d = tl.arange(0, D)
    row = (b * HQ + h) * NUM_SPLITS + offs_s
    lse = tl.load(lse_ptr + row)
    w = tl.exp2(lse - tl.max(lse, axis=0))  # at least one split is non-empty (seq_len >= 1)
    o = tl.load(part_ptr + row[:, None] * D + offs_d[None, :])
    y = tl.sum(o * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, y.to(out_ptr.dtype.element_ty))


def default_num_splits(batch: int, num_kv_heads: int, max_seq_len: int, num_sms: int = 132) -> int:
    """About 4 (sequence, kv head, split) programs per SM, splits of >= 32 tokens, at most 64 (H100 sweep)."""
    want = max(1, math.ceil(4 * num_sms / max(1, batch * num_kv_heads)))
    return int(min(want, max(1, math.ceil(max_seq_len / 32)), 64))


def paged_decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    max_seq_len: int,
    num_splits: int | None = None,
) -> torch.Tensor:
    """q [B, Hq, D] -> [B, Hq, D]; `seq_lens` [B] int32 counts the current token (already in the cache)."""
    bsz, hq, d = q.shape
    hkv = kv_cache.shape[3]
    assert kv_cache.shape[4] == d and hq % hkv == 0 and q.stride(-1) == 1 and kv_cache.stride(-1) == 1
    assert d == triton.next_power_of_2(d)
    group = hq // hkv
    on_gpu = q.is_cuda
    if num_splits is None:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if on_gpu else 4
        num_splits = default_num_splits(bsz, hkv, max_seq_len, sms)
    num_splits = triton.next_power_of_2(num_splits)
    out = torch.empty_like(q)
    if bsz == 0:
        return out
    if num_splits == 1:
        part, lse = out, out
    else:
        part = torch.empty((bsz, hq, num_splits, d), dtype=torch.float32, device=q.device)
        lse = torch.empty((bsz, hq, num_splits), dtype=torch.float32, device=q.device)
    block_t = 32 if d > 128 else 64
    launch = {"num_warps": 4, "num_stages": 2} if on_gpu else {}
    _paged_decode_kernel[(bsz, hkv, num_splits)](
        q, kv_cache, block_tables, seq_lens, part, lse, scale,
        q.stride(0), q.stride(1), kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_tables.stride(0), kv_cache.shape[2],
        D=d, G=group, G_PAD=max(16, triton.next_power_of_2(group)), BLOCK_T=block_t, NUM_SPLITS=num_splits,
        DOT_FP32=not on_gpu, **launch,
    )  # fmt: skip
    if num_splits > 1:
        _merge_splits_kernel[(bsz, hq)](part, lse, out, out.stride(0), out.stride(1), hq, D=d, NUM_SPLITS=num_splits)
    return out

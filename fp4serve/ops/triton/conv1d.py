"""Causal depthwise conv1d + SiLU for the Gated DeltaNet layers, on the slot-indexed conv state (batch.py layout).

State `conv_state[slot]` is [C, W-1] (model dtype): the last W-1 pre-conv inputs, oldest first. Tap `W-1` of the
weight multiplies the current token, tap 0 the token W-1 back (qwen3_5_arch.md §6 step 2).
- decode (`causal_conv1d_update`): one token per sequence; each program reads its channels' state once, writes the
  output and the shifted state in place. Memory-bound and tiny; one launch.
- prefill (`causal_conv1d_varlen`): flat varlen tokens; positions before a sequence's start come from its state
  when `has_initial_state`, else zero; then a second launch writes each sequence's new state (it must run after
  every output program has read the old one).
Accumulation in fp32, SiLU in fp32, one rounding to the output dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def causal_conv1d_varlen_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    conv_state: torch.Tensor,
    cu_seqlens: torch.Tensor,
    state_indices: torch.Tensor,
    has_initial_state: torch.Tensor,
) -> torch.Tensor:
    """Reference for both paths (decode = every sequence of length 1). Updates `conv_state` in place."""
    w = weight.reshape(weight.shape[0], -1).float()  # [C, W]
    width = w.shape[1]
    out = torch.empty_like(x)
    bounds = cu_seqlens.tolist()
    for b in range(len(bounds) - 1):
        s, e = bounds[b], bounds[b + 1]
        slot = int(state_indices[b])
        init = conv_state[slot].float() if bool(has_initial_state[b]) else x.new_zeros(x.shape[1], width - 1).float()
        seq = torch.cat([init.T, x[s:e].float()], dim=0)  # [W-1+L, C]
        for t in range(e - s):
            acc = (seq[t : t + width] * w.T).sum(0)
            out[s + t] = torch.nn.functional.silu(acc).to(x.dtype)
        conv_state[slot] = seq[-(width - 1) :].T.to(conv_state.dtype)
    return out


@triton.jit
def _conv1d_update_kernel(
    x_ptr,
    w_ptr,
    state_ptr,
    idx_ptr,
    init_ptr,
    out_ptr,
    C,
    stride_x,
    stride_out,
    stride_slot,
    W: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = offs < C
    slot = tl.load(idx_ptr + b).to(tl.int64)
    # a sequence without initial state reads zeros (and still writes its new state)
    keep = ok & ((tl.zeros((BLOCK_C,), dtype=tl.int32) + tl.load(init_ptr + b).to(tl.int32)) != 0)
    st = state_ptr + slot * stride_slot + offs * (W - 1)
    x = tl.load(x_ptr + b * stride_x + offs, mask=ok, other=0.0)
    acc = x.to(tl.float32) * tl.load(w_ptr + offs * W + (W - 1), mask=ok, other=0.0).to(tl.float32)
    prev = tl.load(st, mask=keep, other=0.0)
    for i in tl.static_range(W - 1):
        acc += prev.to(tl.float32) * tl.load(w_ptr + offs * W + i, mask=ok, other=0.0).to(tl.float32)
        if i + 1 < W - 1:
            nxt = tl.load(st + i + 1, mask=keep, other=0.0)
            tl.store(st + i, nxt, mask=ok)
            prev = nxt
    tl.store(st + (W - 2), x.to(state_ptr.dtype.element_ty), mask=ok)
    tl.store(out_ptr + b * stride_out + offs, (acc * tl.sigmoid(acc)).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _conv1d_varlen_kernel(
    x_ptr,
    w_ptr,
    state_ptr,
    cu_ptr,
    idx_ptr,
    init_ptr,
    out_ptr,
    C,
    stride_x,
    stride_out,
    stride_slot,
    W: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0)
    start = tl.load(cu_ptr + b).to(tl.int64)
    end = tl.load(cu_ptr + b + 1).to(tl.int64)
    t = start + tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    if start + tl.program_id(1) * BLOCK_T < end:
        offs = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = offs < C
        t_ok = t < end
        slot = tl.load(idx_ptr + b).to(tl.int64)
        has_init = (tl.zeros((BLOCK_T,), dtype=tl.int32) + tl.load(init_ptr + b).to(tl.int32)) != 0
        acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
        for i in tl.static_range(W):
            p = t - (W - 1) + i  # source token of tap i
            in_seq = p >= start
            xv = tl.load(
                x_ptr + p[:, None] * stride_x + offs[None, :],
                mask=(t_ok & in_seq)[:, None] & c_ok[None, :],
                other=0.0,
            )
            sv = tl.load(
                state_ptr + slot * stride_slot + offs[None, :] * (W - 1) + ((W - 1) + (p - start))[:, None],
                mask=(t_ok & (p < start) & has_init)[:, None] & c_ok[None, :],
                other=0.0,
            )
            wi = tl.load(w_ptr + offs * W + i, mask=c_ok, other=0.0).to(tl.float32)
            acc += (xv.to(tl.float32) + sv.to(tl.float32)) * wi[None, :]
        y = acc * tl.sigmoid(acc)
        out = out_ptr + t[:, None] * stride_out + offs[None, :]
        tl.store(out, y.to(out_ptr.dtype.element_ty), mask=t_ok[:, None] & c_ok[None, :])


@triton.jit
def _conv1d_state_kernel(
    x_ptr,
    state_ptr,
    cu_ptr,
    idx_ptr,
    init_ptr,
    C,
    stride_x,
    stride_slot,
    W: tl.constexpr,
    WP: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = offs < C
    start = tl.load(cu_ptr + b).to(tl.int64)
    length = tl.load(cu_ptr + b + 1).to(tl.int64) - start
    slot = tl.load(idx_ptr + b).to(tl.int64)
    has_init = (tl.zeros((WP,), dtype=tl.int32) + tl.load(init_ptr + b).to(tl.int32)) != 0
    st = state_ptr + slot * stride_slot + offs * (W - 1)
    j = tl.arange(0, WP)  # state entries, padded to a power of two
    j_ok = j < W - 1
    pos = length - (W - 1) + j  # position of new state entry j, relative to the sequence start
    from_x = tl.load(
        x_ptr + (start + pos)[None, :] * stride_x + offs[:, None],
        mask=ok[:, None] & (j_ok & (pos >= 0))[None, :],
        other=0.0,
    )
    from_state = tl.load(
        st[:, None] + (length + j)[None, :], mask=ok[:, None] & (j_ok & (pos < 0) & has_init)[None, :], other=0.0
    )
    # every program reads its old entries before it writes: programs own disjoint (slot, channel) ranges
    new = tl.where((pos >= 0)[None, :], from_x.to(tl.float32), from_state.to(tl.float32))
    tl.store(st[:, None] + j[None, :], new.to(state_ptr.dtype.element_ty), mask=ok[:, None] & j_ok[None, :])


def causal_conv1d_update(
    x: torch.Tensor,
    weight: torch.Tensor,
    conv_state: torch.Tensor,
    state_indices: torch.Tensor,
    has_initial_state: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode step: x [B, C] (one token per sequence) -> silu(conv) [B, C]; shifts conv_state[slot] in place.
    `has_initial_state` [B] bool (None = all True): False reads a zero state."""
    bsz, c = x.shape
    w = weight.reshape(c, -1)
    width = w.shape[1]
    assert conv_state.shape[1:] == (c, width - 1) and conv_state.stride(-1) == 1 and conv_state.stride(1) == width - 1
    out = torch.empty_like(x)
    block_c = 256
    grid = (bsz, triton.cdiv(c, block_c))
    init = (
        torch.ones(bsz, dtype=torch.int8, device=x.device)
        if has_initial_state is None
        else has_initial_state.to(torch.int8)
    )
    _conv1d_update_kernel[grid](
        x, w.contiguous(), conv_state, state_indices, init, out, c, x.stride(0), out.stride(0), conv_state.stride(0),
        W=width, BLOCK_C=block_c,
    )  # fmt: skip
    return out


def causal_conv1d_varlen(
    x: torch.Tensor,
    weight: torch.Tensor,
    conv_state: torch.Tensor,
    cu_seqlens: torch.Tensor,
    state_indices: torch.Tensor,
    has_initial_state: torch.Tensor,
    max_seqlen: int,
) -> torch.Tensor:
    """Prefill: x [T, C] flat varlen tokens -> silu(conv) [T, C]; writes each sequence's last W-1 inputs to its slot."""
    t, c = x.shape
    w = weight.reshape(c, -1).contiguous()
    width = w.shape[1]
    assert conv_state.shape[1:] == (c, width - 1) and conv_state.stride(-1) == 1 and conv_state.stride(1) == width - 1
    out = torch.empty_like(x)
    bsz = cu_seqlens.shape[0] - 1
    if t == 0 or bsz == 0:
        return out
    init = has_initial_state.to(torch.int8)
    block_t, block_c = 16, 128
    grid = (bsz, triton.cdiv(max_seqlen, block_t), triton.cdiv(c, block_c))
    _conv1d_varlen_kernel[grid](
        x, w, conv_state, cu_seqlens, state_indices, init, out, c, x.stride(0), out.stride(0), conv_state.stride(0),
        W=width, BLOCK_T=block_t, BLOCK_C=block_c,
    )  # fmt: skip
    _conv1d_state_kernel[(bsz, triton.cdiv(c, block_c))](
        x, conv_state, cu_seqlens, state_indices, init, c, x.stride(0), conv_state.stride(0),
        W=width, WP=triton.next_power_of_2(width - 1), BLOCK_C=block_c,
    )  # fmt: skip
    return out

"""Gated DeltaNet recurrence (qwen3_5_arch.md §6 steps 4-7) on the slot-indexed fp32 state of batch.py.

- `gdn_recurrent`: our Triton kernel, one program per (sequence, value head, value block), the [K, BV] state tile in
  registers, tokens processed in order. It reads `ssm_state[state_indices[b]]` and writes it back in place (no
  gather/scatter copies: decode is state-bandwidth bound, 64 KiB per head read and written per step), and fuses the
  q/k L2 norm, the query scale, and the gates (beta = sigmoid(b), g = -exp(A_log) * softplus(a + dt_bias)). Used for
  decode (one token per sequence) and correct for any varlen batch, but sequential in time.
- `gdn_chunk_prefill`: long prompts through fla-core's chunked kernel (`chunk_gated_delta_rule`, the UT/WY form),
  with our gather of initial states (zero where `has_initial_state` is False) and scatter of final states.
Value head j reads query/key head j // (HV / H) (repeat_interleave, not tiling), the same as fla's GVA.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fp4serve.ops.gdn import gdn_gates_ref


def gdn_recurrent_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    ssm_state: torch.Tensor,
    state_indices: torch.Tensor,
    cu_seqlens: torch.Tensor,
    has_initial_state: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Per-token float64 loop of §6 step 7. q, k [T, H, K]; v [T, HV, V]; a, b [T, HV]. Updates ssm_state."""
    _, h, dk = q.shape
    hv = v.shape[1]
    scale = dk**-0.5 if scale is None else scale
    g, beta = gdn_gates_ref(a, b, A_log, dt_bias)
    rep = hv // h
    qn = q.double() * torch.rsqrt((q.double() ** 2).sum(-1, keepdim=True) + 1e-6)
    kn = k.double() * torch.rsqrt((k.double() ** 2).sum(-1, keepdim=True) + 1e-6)
    qn = qn.repeat_interleave(rep, dim=1) * scale
    kn = kn.repeat_interleave(rep, dim=1)
    out = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    bounds = cu_seqlens.tolist()
    for i in range(len(bounds) - 1):
        slot = int(state_indices[i])
        s = (
            ssm_state[slot].double()
            if bool(has_initial_state[i])
            else torch.zeros_like(ssm_state[slot], dtype=torch.float64)
        )
        for t in range(bounds[i], bounds[i + 1]):
            s = s * g[t].double().exp()[:, None, None]
            u = beta[t].double()[:, None] * (v[t].double() - torch.einsum("hkv,hk->hv", s, kn[t]))
            s = s + kn[t][:, :, None] * u[:, None, :]
            out[t] = torch.einsum("hkv,hk->hv", s, qn[t]).to(v.dtype)
        ssm_state[slot] = s.to(ssm_state.dtype)
    return out


@triton.jit
def _gdn_recurrent_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    a_ptr,
    b_ptr,
    alog_ptr,
    dtb_ptr,
    state_ptr,
    idx_ptr,
    cu_ptr,
    init_ptr,
    o_ptr,
    scale,
    stride_qt,
    stride_kt,
    stride_vt,
    stride_at,
    stride_bt,
    stride_ot,
    stride_slot,
    HV: tl.constexpr,
    REP: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BV: tl.constexpr,
    RAW_GATES: tl.constexpr,
    QK_L2NORM: tl.constexpr,
):
    # RAW_GATES: a, b are the in_proj outputs (gates computed here); else a = g (log decay), b = beta, fp32.
    # QK_L2NORM: normalize q and k here; else the caller already did.
    seq = tl.program_id(0).to(tl.int64)
    hv = tl.program_id(1)
    h = hv // REP
    offs_k = tl.arange(0, K)
    offs_v = tl.program_id(2) * BV + tl.arange(0, BV)
    start = tl.load(cu_ptr + seq).to(tl.int64)
    end = tl.load(cu_ptr + seq + 1).to(tl.int64)
    slot = tl.load(idx_ptr + seq).to(tl.int64)
    st = state_ptr + slot * stride_slot + hv * (K * V) + offs_k[:, None] * V + offs_v[None, :]  # [K, BV]
    keep = (tl.zeros((K, BV), dtype=tl.int32) + tl.load(init_ptr + seq).to(tl.int32)) != 0
    s = tl.load(st, mask=keep, other=0.0)
    if RAW_GATES:
        neg_a = -tl.exp(tl.load(alog_ptr + hv).to(tl.float32))
        dtb = tl.load(dtb_ptr + hv).to(tl.float32)
    for t in range(start, end):
        q = tl.load(q_ptr + t * stride_qt + h * K + offs_k).to(tl.float32)
        k = tl.load(k_ptr + t * stride_kt + h * K + offs_k).to(tl.float32)
        if QK_L2NORM:
            q = q * tl.rsqrt(tl.sum(q * q, axis=0) + 1e-6)
            k = k * tl.rsqrt(tl.sum(k * k, axis=0) + 1e-6)
        q = q * scale
        v = tl.load(v_ptr + t * stride_vt + hv * V + offs_v).to(tl.float32)
        if RAW_GATES:
            x = tl.load(a_ptr + t * stride_at + hv).to(tl.float32) + dtb
            softplus = tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))
            g = neg_a * softplus
            beta = tl.sigmoid(tl.load(b_ptr + t * stride_bt + hv).to(tl.float32))
        else:
            g = tl.load(a_ptr + t * stride_at + hv).to(tl.float32)
            beta = tl.load(b_ptr + t * stride_bt + hv).to(tl.float32)
        s = s * tl.exp(g)
        u = beta * (v - tl.sum(s * k[:, None], axis=0))  # [BV]
        s = s + k[:, None] * u[None, :]
        o = tl.sum(s * q[:, None], axis=0)
        tl.store(o_ptr + t * stride_ot + hv * V + offs_v, o.to(o_ptr.dtype.element_ty))
    tl.store(st, s)


def _heads_view_ok(x: torch.Tensor) -> bool:
    return x.stride(-1) == 1 and x.stride(-2) == x.shape[-1]


def gdn_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    ssm_state: torch.Tensor,
    state_indices: torch.Tensor,
    cu_seqlens: torch.Tensor,
    has_initial_state: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Triton `gdn_recurrent_ref`: q, k [T, H, K], v [T, HV, V] (row-strided views of the conv output are fine),
    a, b [T, HV]; returns o [T, HV, V] in v's dtype and updates ssm_state [slots, HV, K, V] (fp32) in place."""
    return _recurrent(q, k, v, a, b, A_log, dt_bias, ssm_state, state_indices, cu_seqlens, has_initial_state, scale)


def _recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    ssm_state: torch.Tensor,
    state_indices: torch.Tensor,
    cu_seqlens: torch.Tensor,
    has_initial_state: torch.Tensor,
    scale: float | None,
) -> torch.Tensor:
    raw_gates = A_log is not None
    if not raw_gates:
        A_log = dt_bias = a  # unused by the kernel
    t, h, dk = q.shape
    hv, dv = v.shape[1], v.shape[2]
    q = q if _heads_view_ok(q) else q.contiguous()
    k = k if _heads_view_ok(k) else k.contiguous()
    v = v if _heads_view_ok(v) else v.contiguous()
    a = a if a.stride(-1) == 1 else a.contiguous()
    b = b if b.stride(-1) == 1 else b.contiguous()
    assert ssm_state.is_contiguous() and ssm_state.dtype == torch.float32 and ssm_state.shape[1:] == (hv, dk, dv)
    assert dk == triton.next_power_of_2(dk) and hv % h == 0
    out = torch.empty((t, hv, dv), dtype=v.dtype, device=v.device)
    bsz = cu_seqlens.shape[0] - 1
    if t == 0 or bsz == 0:
        return out
    bv = min(32, triton.next_power_of_2(dv))
    assert dv % bv == 0
    launch = {"num_warps": 4} if q.is_cuda else {}
    _gdn_recurrent_kernel[(bsz, hv, dv // bv)](
        q, k, v, a, b, A_log, dt_bias, ssm_state, state_indices, cu_seqlens, has_initial_state.to(torch.int8), out,
        dk**-0.5 if scale is None else scale,
        q.stride(0), k.stride(0), v.stride(0), a.stride(0), b.stride(0), out.stride(0), ssm_state.stride(0),
        HV=hv, REP=hv // h, K=dk, V=dv, BV=bv, RAW_GATES=raw_gates, QK_L2NORM=raw_gates, **launch,
    )  # fmt: skip
    return out


def gated_delta_rule_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    cu_seqlens: torch.Tensor,
    state_indices: torch.Tensor,
    has_initial_state: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Same contract as fp4serve.ops.gdn's refs: q, k already L2-normalized, g (log decay) and beta given [T, HV]."""
    return _recurrent(q, k, v, g, beta, None, None, state, state_indices, cu_seqlens, has_initial_state, scale)


def gdn_chunk_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    ssm_state: torch.Tensor,
    state_indices: torch.Tensor,
    cu_seqlens: torch.Tensor,
    has_initial_state: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """`gdn_recurrent` semantics through fla-core's chunked kernel (GPU only; needs the fla-core package)."""
    g, beta = gdn_gates_ref(a, b, A_log, dt_bias)
    return _chunk_fla(q, k, v, g, beta, ssm_state, cu_seqlens, state_indices, has_initial_state, scale, True)


def gated_delta_rule_chunk_fla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    cu_seqlens: torch.Tensor,
    state_indices: torch.Tensor,
    has_initial_state: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """fp4serve.ops.gdn's contract (q, k already L2-normalized; g, beta given) through fla-core's chunked kernel."""
    return _chunk_fla(q, k, v, g, beta, state, cu_seqlens, state_indices, has_initial_state, scale, False)


def _chunk_fla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    cu_seqlens: torch.Tensor,
    state_indices: torch.Tensor,
    has_initial_state: torch.Tensor,
    scale: float | None,
    qk_l2norm: bool,
) -> torch.Tensor:
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    init = state.index_select(0, state_indices.long())
    init = torch.where(has_initial_state.view(-1, 1, 1, 1), init, torch.zeros_like(init))
    o, final = chunk_gated_delta_rule(
        q.contiguous().unsqueeze(0),
        k.contiguous().unsqueeze(0),
        v.contiguous().unsqueeze(0),
        g.float().unsqueeze(0),
        beta.float().unsqueeze(0),
        scale=scale,
        initial_state=init,
        output_final_state=True,
        use_qk_l2norm_in_kernel=qk_l2norm,
        cu_seqlens=cu_seqlens.long(),
    )
    state.index_copy_(0, state_indices.long(), final.to(state.dtype))
    return o.squeeze(0).to(v.dtype)

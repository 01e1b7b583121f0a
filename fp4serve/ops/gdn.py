"""The gated delta rule of Gated DeltaNet: chunked form for prefill, recurrent form for decode.

Per value head, with a float32 state `S` [K, V] and `alpha_t = exp(g_t)`:
    S <- alpha_t * S;  u = beta_t * (v_t - S^T k_t);  S <- S + k_t u^T;  o_t = S^T (scale * q_t)
Inputs are flat varlen tokens: q, k [N, HK, K] (value head j reads key head j // (HV / HK)), v [N, HV, V],
g, beta [N, HV] (float32, g <= 0). Each sequence starts from its slot `state_indices[i]` of `state`
[num_slots, HV, K, V] (zeros where `has_initial_state[i]` is False), and its final state is written back to that
slot in place, so prefill, chunked prefill and decode chain exactly.

`chunk_gated_delta_rule_ref` processes 64-token chunks at once. Inside a chunk, with cumulative log-decay
`G_t = g_1 + ... + g_t` and `D[t, s] = exp(G_t - G_s)` (s <= t), the corrections solve a unit lower-triangular
system `(I + A) U = beta * (V - exp(G) K S0)`, `A[t, s] = beta_t D[t, s] k_t.k_s` for s < t (the UT/WY trick), and
then `O = exp(G) Q S0 + (D * Q K^T) U` and `S_end = exp(G_C) S0 + (D[C, :] * K)^T U`. It is mathematically the
recurrence; the test checks it against the per-token loop. q, k are expected L2-normalised by the caller.

`gated_delta_rule_decode` takes the raw projections instead (q, k before the L2 norm; a, b before the gates
`g = -exp(A_log) * softplus(a + dt_bias)`, `beta = sigmoid(b)`), so a decode step needs one kernel per layer rather
than a dozen small ones.

On CUDA the public functions run Triton: decode through `fp4serve.ops.triton.gdn`'s recurrent kernel (state read and
written in place at its slot, no host syncs, so it can be captured in a CUDA graph); prefill through fla-core's
chunked kernel when the `fla` package imports and the activations are 16-bit, else the same recurrent kernel
(correct for any lengths, but sequential in time). Anything else falls back to the references.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from fp4serve.ops.backend import is_power_of_two, use_kernels
from fp4serve.ops.norm import l2_norm_ref

CHUNK_SIZE = 64


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _expand_heads(x: torch.Tensor, num_v_heads: int) -> torch.Tensor:
    """[..., HK, K] → [..., HV, K]: value head j uses key head j // (HV / HK)."""
    return x.repeat_interleave(num_v_heads // x.shape[-2], dim=-2)


def _initial_state(state: torch.Tensor, slot: int, has_initial: bool, dtype: torch.dtype) -> torch.Tensor:
    init = state[slot].to(dtype)
    return init if has_initial else torch.zeros_like(init)


def gated_delta_rule_recurrent_ref(
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
    """Token-by-token loop: the plainest statement of the rule; o [N, HV, V] in v's dtype."""
    num_v_heads = v.shape[1]
    dtype = _compute_dtype(v, state)
    qe = _expand_heads(q.to(dtype), num_v_heads) * scale
    ke = _expand_heads(k.to(dtype), num_v_heads)
    vd, gd, bd = v.to(dtype), g.to(dtype), beta.to(dtype)
    o = torch.empty(v.shape, dtype=dtype, device=v.device)
    bounds = cu_seqlens.tolist()
    for i, slot in enumerate(state_indices.tolist()):
        s = _initial_state(state, slot, bool(has_initial_state[i]), dtype)  # [HV, K, V]
        for t in range(bounds[i], bounds[i + 1]):
            s = s * gd[t].exp()[:, None, None]
            u = bd[t][:, None] * (vd[t] - torch.einsum("hkv,hk->hv", s, ke[t]))
            s = s + ke[t][:, :, None] * u[:, None, :]
            o[t] = torch.einsum("hkv,hk->hv", s, qe[t])
        state[slot] = s.to(state.dtype)
    return o.to(v.dtype)


def _chunked_sequence(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, s: torch.Tensor, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence, all heads: q, k [H, L, K], v [H, L, V], g, beta [H, L], s [H, K, V] → (o [H, L, V], s_end).

    The intra-chunk work (decays, the triangular solve, the WY factors) runs for all chunks at once; only the
    chunk-to-chunk state update is a loop. The tail is padded with k = v = beta = g = 0 tokens, which neither
    decay nor write the state."""
    heads, length = g.shape
    n = -(-length // size)
    pad = n * size - length

    def chunks(x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad) if x.dim() == 3 else (0, pad))
        return x.reshape(heads, n, size, *x.shape[2:])

    q, k, v, g, beta = chunks(q), chunks(k), chunks(v), chunks(g), chunks(beta)  # [H, n, C, ...]
    cum = g.cumsum(dim=-1)  # [H, n, C]
    causal = torch.ones(size, size, dtype=torch.bool, device=g.device).tril()
    decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # [H, n, C, C]
    a = (beta[..., None] * decay * (k @ k.transpose(-1, -2))).tril(-1)
    lower = a + torch.eye(size, dtype=g.dtype, device=g.device)
    rhs = torch.cat((beta[..., None] * v, (beta * cum.exp())[..., None] * k), dim=-1)
    solved = torch.linalg.solve_triangular(lower, rhs, upper=False, unitriangular=True)
    u_free, w = solved[..., : v.shape[-1]], solved[..., v.shape[-1] :]
    q_decayed = cum.exp()[..., None] * q  # reads the chunk's initial state
    qk = decay * (q @ k.transpose(-1, -2))  # intra-chunk scores
    k_to_end = (cum[..., -1:] - cum).exp()[..., None] * k  # writes into the chunk's final state
    o = torch.empty_like(v)
    for c in range(n):
        u = u_free[:, c] - w[:, c] @ s  # [H, C, V]
        o[:, c] = q_decayed[:, c] @ s + qk[:, c] @ u
        s = cum[:, c, -1].exp()[:, None, None] * s + k_to_end[:, c].transpose(-1, -2) @ u
    return o.reshape(heads, n * size, -1)[:, :length], s


def chunk_gated_delta_rule_ref(
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
    chunk_size: int = CHUNK_SIZE,
) -> torch.Tensor:
    """Chunked (UT/WY) form over varlen sequences; same contract as `gated_delta_rule_recurrent_ref`."""
    num_v_heads = v.shape[1]
    dtype = _compute_dtype(v, state)
    qe = (_expand_heads(q.to(dtype), num_v_heads) * scale).transpose(0, 1)  # [HV, N, K]
    ke = _expand_heads(k.to(dtype), num_v_heads).transpose(0, 1)
    vd, gd, bd = v.to(dtype).transpose(0, 1), g.to(dtype).t(), beta.to(dtype).t()
    o = torch.empty(vd.shape, dtype=dtype, device=v.device)  # [HV, N, V]
    bounds = cu_seqlens.tolist()
    for i, slot in enumerate(state_indices.tolist()):
        s = _initial_state(state, slot, bool(has_initial_state[i]), dtype)
        span = slice(bounds[i], bounds[i + 1])
        if span.start < span.stop:
            o[:, span], s = _chunked_sequence(
                qe[:, span], ke[:, span], vd[:, span], gd[:, span], bd[:, span], s, chunk_size
            )
        state[slot] = s.to(state.dtype)
    return o.transpose(0, 1).to(v.dtype)


def gated_delta_rule_step_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    state_indices: torch.Tensor,
    has_initial_state: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Decode: one token per sequence, batched. q, k [B, HK, K], v [B, HV, V], g, beta [B, HV] → o [B, HV, V]."""
    num_v_heads = v.shape[1]
    dtype = _compute_dtype(v, state)
    qe = _expand_heads(q.to(dtype), num_v_heads) * scale
    ke = _expand_heads(k.to(dtype), num_v_heads)
    s = state[state_indices].to(dtype)  # [B, HV, K, V]
    s = torch.where(has_initial_state[:, None, None, None], s, torch.zeros_like(s))
    s = s * g.to(dtype).exp()[:, :, None, None]
    u = beta.to(dtype)[:, :, None] * (v.to(dtype) - torch.einsum("bhkv,bhk->bhv", s, ke))
    s = s + ke[:, :, :, None] * u[:, :, None, :]
    o = torch.einsum("bhkv,bhk->bhv", s, qe)
    state[state_indices] = s.to(state.dtype)
    return o.to(v.dtype)


def chunk_gated_delta_rule(
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
    """Prefill (any query lengths): fla-core's chunked kernel or our recurrent kernel on CUDA, else the reference."""
    if _kernels_fit(q, v, state):
        from fp4serve.ops.triton import gdn as kernels

        if v.dtype in (torch.bfloat16, torch.float16) and _fla_importable():
            # fla's kernels take q, k, v in one 16-bit dtype
            qh, kh = q.to(v.dtype), k.to(v.dtype)
            return kernels.gated_delta_rule_chunk_fla(
                qh, kh, v, g, beta, state, cu_seqlens, state_indices, has_initial_state, scale
            )
        return kernels.gated_delta_rule_recurrent(
            q, k, v, g, beta, state, cu_seqlens, state_indices, has_initial_state, scale
        )
    return chunk_gated_delta_rule_ref(q, k, v, g, beta, state, cu_seqlens, state_indices, has_initial_state, scale)


def recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    state_indices: torch.Tensor,
    has_initial_state: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Decode (one token per sequence): the recurrent kernel on CUDA, else the batched step reference."""
    if _kernels_fit(q, v, state):
        from fp4serve.ops.triton.gdn import gated_delta_rule_recurrent

        cu_seqlens = torch.arange(v.shape[0] + 1, dtype=torch.int32, device=v.device)
        return gated_delta_rule_recurrent(q, k, v, g, beta, state, cu_seqlens, state_indices, has_initial_state, scale)
    return gated_delta_rule_step_ref(q, k, v, g, beta, state, state_indices, has_initial_state, scale)


def gdn_gates_ref(
    a: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(g, beta) in float32 [N, HV]: g = -exp(A_log) * softplus(a + dt_bias) (log-decay <= 0), beta = sigmoid(b)."""
    g = -A_log.float().exp() * F.softplus(a.float() + dt_bias.float())
    return g, b.float().sigmoid()


def gated_delta_rule_decode_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    state: torch.Tensor,
    state_indices: torch.Tensor,
    has_initial_state: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One token per sequence from the raw projections: q, k [B, HK, K] before the L2 norm, gate inputs a, b [B, HV]."""
    g, beta = gdn_gates_ref(a, b, A_log, dt_bias)
    return gated_delta_rule_step_ref(
        l2_norm_ref(q), l2_norm_ref(k), v, g, beta, state, state_indices, has_initial_state, scale
    )


def gated_delta_rule_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    state: torch.Tensor,
    state_indices: torch.Tensor,
    has_initial_state: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Decode step with the L2 norms and gates fused in: one Triton kernel on CUDA (no host syncs), else the
    composed reference (`l2_norm_ref`, `gdn_gates_ref`, `gated_delta_rule_step_ref`)."""
    if _kernels_fit(q, v, state):
        from fp4serve.ops.triton.gdn import gdn_recurrent

        cu_seqlens = torch.arange(v.shape[0] + 1, dtype=torch.int32, device=v.device)
        return gdn_recurrent(q, k, v, a, b, A_log, dt_bias, state, state_indices, cu_seqlens, has_initial_state, scale)
    return gated_delta_rule_decode_ref(q, k, v, a, b, A_log, dt_bias, state, state_indices, has_initial_state, scale)


def _kernels_fit(q: torch.Tensor, v: torch.Tensor, state: torch.Tensor) -> bool:
    """The Triton kernels want a CUDA fp32 contiguous state, a power-of-two key dim and whole 32-wide value blocks."""
    dv = v.shape[-1]
    return (
        use_kernels(v)
        and state.dtype == torch.float32
        and state.is_contiguous()
        and is_power_of_two(q.shape[-1])
        and (dv % 32 == 0 or is_power_of_two(dv))
        and v.shape[1] % q.shape[1] == 0
    )


@functools.cache
def _fla_importable() -> bool:
    try:
        import fla.ops.gated_delta_rule  # noqa: F401
    # an optional accelerator: any import failure (missing dependency, unsupported Triton) means "not available"
    except Exception:
        return False
    return True

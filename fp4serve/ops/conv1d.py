"""Causal depthwise conv1d (+ SiLU) of the Gated DeltaNet layers, over a flat varlen batch with cached state.

Each sequence continues from its conv state: the last `W - 1` pre-conv inputs (oldest first) kept in the slot
`state_indices[i]` of `conv_state` [num_slots, C, W - 1], or zeros where `has_initial_state[i]` is False. After the
call the slot holds the last `W - 1` inputs of the (state + new tokens) stream, so prefill, chunked prefill and
decode chain exactly. `causal_conv1d` handles any query lengths (prefill); `causal_conv1d_update` is the one-token
step of decode. Arithmetic is float32 (float64 when given float64); outputs take the input dtype.

On CUDA (with SiLU, the only activation the model uses) the public functions run the Triton kernels of
`fp4serve.ops.triton.conv1d`: the decode update reads lengths from nothing on the host, so it can be captured in a
CUDA graph; the varlen prefill needs the longest query length for its grid (`max_seqlen`, from the batch's host-side
metadata; read back from the device only when the caller does not pass it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fp4serve.ops.backend import use_kernels


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def causal_conv1d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    conv_state: torch.Tensor,
    cu_seqlens: torch.Tensor,
    state_indices: torch.Tensor,
    has_initial_state: torch.Tensor,
    activation: bool = True,
) -> torch.Tensor:
    """x [N, C], weight [C, W] → y [N, C]; updates conv_state [S, C, W-1] in place at state_indices."""
    width = weight.shape[1]
    dtype = _compute_dtype(x)
    w = weight.to(dtype)[:, None, :]  # [C, 1, W]
    y = torch.empty_like(x)
    bounds = cu_seqlens.tolist()
    for i, slot in enumerate(state_indices.tolist()):
        start, end = bounds[i], bounds[i + 1]
        init = conv_state[slot].to(dtype)
        if not bool(has_initial_state[i]):
            init = torch.zeros_like(init)
        stream = torch.cat((init, x[start:end].t().to(dtype)), dim=1)  # [C, W-1+L]
        out = F.conv1d(stream[None], w, groups=w.shape[0])[0]  # [C, L]
        y[start:end] = (F.silu(out) if activation else out).t().to(x.dtype)
        conv_state[slot] = stream[:, stream.shape[1] - (width - 1) :].to(conv_state.dtype)
    return y


def causal_conv1d_update_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    conv_state: torch.Tensor,
    state_indices: torch.Tensor,
    has_initial_state: torch.Tensor,
    activation: bool = True,
) -> torch.Tensor:
    """One new token per sequence: x [B, C] → y [B, C]; shifts conv_state [S, C, W-1] in place."""
    dtype = _compute_dtype(x)
    state = conv_state[state_indices].to(dtype)  # [B, C, W-1]
    state = torch.where(has_initial_state[:, None, None], state, torch.zeros_like(state))
    window = torch.cat((state, x.to(dtype)[:, :, None]), dim=2)  # [B, C, W]
    out = (window * weight.to(dtype)).sum(dim=-1)
    conv_state[state_indices] = window[:, :, 1:].to(conv_state.dtype)
    return (F.silu(out) if activation else out).to(x.dtype)


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    conv_state: torch.Tensor,
    cu_seqlens: torch.Tensor,
    state_indices: torch.Tensor,
    has_initial_state: torch.Tensor,
    activation: bool = True,
    max_seqlen: int | None = None,
) -> torch.Tensor:
    """Prefill (any query lengths); `max_seqlen` is the longest query length (None: computed, a device sync)."""
    if activation and use_kernels(x) and _state_layout_ok(conv_state, weight):
        from fp4serve.ops.triton.conv1d import causal_conv1d_varlen

        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
        return causal_conv1d_varlen(
            _rows(x), weight, conv_state, cu_seqlens, state_indices, has_initial_state, max_seqlen
        )
    return causal_conv1d_ref(x, weight, conv_state, cu_seqlens, state_indices, has_initial_state, activation)


def causal_conv1d_update(
    x: torch.Tensor,
    weight: torch.Tensor,
    conv_state: torch.Tensor,
    state_indices: torch.Tensor,
    has_initial_state: torch.Tensor,
    activation: bool = True,
) -> torch.Tensor:
    """Decode (one token per sequence); no host syncs on CUDA."""
    if activation and use_kernels(x) and _state_layout_ok(conv_state, weight):
        from fp4serve.ops.triton.conv1d import causal_conv1d_update as update

        return update(_rows(x), weight, conv_state, state_indices, has_initial_state)
    return causal_conv1d_update_ref(x, weight, conv_state, state_indices, has_initial_state, activation)


def _state_layout_ok(conv_state: torch.Tensor, weight: torch.Tensor) -> bool:
    """The kernels address conv_state as contiguous [S, C, W-1] rows."""
    width = weight.shape[-1]
    return conv_state.dim() == 3 and conv_state.shape[2] == width - 1 and conv_state.is_contiguous()


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()

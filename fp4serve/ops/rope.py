"""Partial, interleaved multimodal RoPE (MRoPE) of the Qwen3.5 text attention.

Positions are `[3, N]` (temporal, height, width rows; all equal for text). Only the first `rotary_dim` dims of each
head rotate, with rotate-half (NeoX) pairing `(j, j + rotary_dim/2)`. Frequency `j` takes its angle from the H row
when `j % 3 == 1` and the W row when `j % 3 == 2` (within the first `3 * mrope_section[axis]` frequencies), and from
the T row otherwise. cos/sin are built once per step (`mrope_cos_sin`) and shared by every attention layer; angles
are computed in float32 exactly as `inv_freq * position`, so they match the reference bit for bit.
"""

from __future__ import annotations

import torch


def mrope_axis_of_frequency(
    half: int, mrope_section: tuple[int, ...], device: torch.device | str | None = None
) -> torch.Tensor:
    """[half] int64: which position row (0 = T, 1 = H, 2 = W) drives each rotary frequency (built on `device`
    with tensor ops only, so it can be captured in a CUDA graph)."""
    j = torch.arange(half, device=device)
    use_h = (j % 3 == 1) & (j < 3 * mrope_section[1])
    use_w = (j % 3 == 2) & (j < 3 * mrope_section[2])
    return torch.where(use_h, 1, torch.where(use_w, 2, 0))


def mrope_cos_sin(
    positions: torch.Tensor, rotary_dim: int, theta: float, mrope_section: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [3, N] → (cos, sin), each [N, rotary_dim // 2] float32."""
    half = rotary_dim // 2
    device = positions.device
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=device) / rotary_dim))
    axis = mrope_axis_of_frequency(half, mrope_section, device)
    pos = positions.float().index_select(0, axis)  # [half, N]
    freqs = pos.t() * inv_freq  # [N, half]
    return freqs.cos(), freqs.sin()


def apply_rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first 2 * cos.shape[-1] dims of x [N, H, D] in float32; the rest passes through."""
    half = cos.shape[-1]
    xf = x.float()
    x1, x2, rest = xf[..., :half], xf[..., half : 2 * half], xf[..., 2 * half :]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s, rest), dim=-1).to(x.dtype)


def apply_mrope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [N, H, D], k [N, Hk, D] with cos/sin from `mrope_cos_sin` → rotated (q, k)."""
    return apply_rope_ref(q, cos, sin), apply_rope_ref(k, cos, sin)

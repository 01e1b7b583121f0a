"""Norms of Qwen3.5: the zero-centred `(1 + w)` RMSNorm, the gated RMSNorm of the DeltaNet output, and the L2 norm
of the DeltaNet q/k heads.

Two different norms live here on purpose (an easy-to-miss detail of the architecture): every decoder norm, the final
norm and the attention q/k norms scale by `1 + w` (weights stored around zero), while the DeltaNet output norm scales
by plain `w` and multiplies by `silu(z)`. Statistics are computed in float32 and the result is cast back to the
input dtype. `rms_norm_residual` is the decoder's pre-norm with the residual add fused in: the sum is rounded to the
model dtype first (that rounded sum is what HF normalizes and carries on). On CUDA the public functions run the
Triton kernels of `fp4serve.ops.triton.rmsnorm` (one read and one write per row); elsewhere the references.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fp4serve.ops.backend import use_kernels


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`x * rsqrt(mean(x^2) + eps) * (1 + w)` over the last dim, computed in float32."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (normed * (1.0 + weight.float())).to(x.dtype)


def gated_rms_norm_ref(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`w * norm(x) * silu(z)` over the last dim (plain weight, not `1 + w`); x, z: [..., D], weight: [D]."""
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)).to(x.dtype)
    return (weight * normed * F.silu(z.float())).to(x.dtype)


def rms_norm_residual_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual), x + residual), the sum in x's dtype."""
    h = x + residual
    return rms_norm_ref(h, weight, eps), h


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if use_kernels(x):
        from fp4serve.ops.triton.rmsnorm import rmsnorm

        return rmsnorm(x, weight, eps)
    return rms_norm_ref(x, weight, eps)


def rms_norm_residual(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused `h = x + residual; (norm(h), h)`: one pass instead of an add kernel plus a norm kernel."""
    if use_kernels(x) and residual.dtype == x.dtype:
        from fp4serve.ops.triton.rmsnorm import rmsnorm

        return rmsnorm(x, weight, eps, residual=residual)
    return rms_norm_residual_ref(x, residual, weight, eps)


def gated_rms_norm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if use_kernels(x) and z.shape == x.shape:
        from fp4serve.ops.triton.rmsnorm import gated_rmsnorm

        return gated_rmsnorm(x, z, weight, eps)
    return gated_rms_norm_ref(x, z, weight, eps)


def l2_norm_ref(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """`x * rsqrt(sum(x^2) + eps)` over the last dim, in float32 (float64 stays float64)."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return xf * torch.rsqrt(xf.pow(2).sum(dim=-1, keepdim=True) + eps)


def l2_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return l2_norm_ref(x, eps)

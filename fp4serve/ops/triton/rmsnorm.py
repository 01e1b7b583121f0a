"""RMSNorm kernels: zero-centred RMSNorm with an optional fused residual add, and the DeltaNet gated RMSNorm.

One program normalizes one row (hidden 5120 fits a single block), so each row is read once and written once; the
fused variant also writes the new residual, saving a separate add kernel and a re-read per decoder layer.
Numerics follow qwen3_5_arch.md §3 exactly: the residual sum is rounded to the model dtype first (that rounded sum
is what HF normalizes and carries on), statistics in fp32, `x * rsqrt(mean(x^2) + eps) * (1 + w)` cast once.
Gated: `w * dtype(x * rsqrt(mean(x^2) + eps)) * silu(z)` in fp32, cast once (the normed value is rounded to the
model dtype before the weight, as the reference does).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def rmsnorm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Zero-centred RMSNorm of `x` (or of `x + residual`, returning (normed, new_residual))."""
    if residual is not None:
        x = x + residual
    h = x.float()
    y = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + weight.float())).to(x.dtype)
    return y if residual is None else (y, x)


def gated_rmsnorm_ref(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gated RMSNorm over the last dim (plain weight): `w * norm(x) * silu(z)`."""
    h = x.float()
    n = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (weight.float() * n.float() * torch.nn.functional.silu(z.float())).to(x.dtype)


@triton.jit
def _rmsnorm_kernel(
    x_ptr,
    r_ptr,
    w_ptr,
    y_ptr,
    r_out_ptr,
    D,
    stride_x,
    stride_r,
    stride_y,
    stride_ro,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < D
    x = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + tl.load(r_ptr + row * stride_r + offs, mask=ok, other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(r_out_ptr + row * stride_ro + offs, x, mask=ok)
    h = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(h * h, axis=0) / D + eps)
    w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + offs, (h * rstd * (1.0 + w)).to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _gated_rmsnorm_kernel(x_ptr, z_ptr, w_ptr, y_ptr, D, stride_x, stride_z, stride_y, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < D
    x = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0)
    h = x.to(tl.float32)
    n = (h * tl.rsqrt(tl.sum(h * h, axis=0) / D + eps)).to(x.dtype).to(tl.float32)
    z = tl.load(z_ptr + row * stride_z + offs, mask=ok, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + offs, (w * n * (z * tl.sigmoid(z))).to(y_ptr.dtype.element_ty), mask=ok)


def _rows(t: torch.Tensor, d: int) -> torch.Tensor:
    t2 = t.reshape(-1, d)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _warps(block: int) -> int:
    return 1 if block <= 256 else 4 if block <= 2048 else 8


def rmsnorm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Triton `rmsnorm_ref`: [..., D] rows; with `residual`, returns (normed, x + residual)."""
    d = x.shape[-1]
    x2 = _rows(x, d)
    y = torch.empty_like(x2)
    r2 = _rows(residual, d) if residual is not None else x2
    r_out = torch.empty_like(x2) if residual is not None else y
    block = triton.next_power_of_2(d)
    launch = {"num_warps": _warps(block)} if x.is_cuda else {}
    _rmsnorm_kernel[(x2.shape[0],)](
        x2, r2, weight, y, r_out, d, x2.stride(0), r2.stride(0), y.stride(0), r_out.stride(0), eps,
        HAS_RESIDUAL=residual is not None, BLOCK=block, **launch,
    )  # fmt: skip
    if residual is None:
        return y.reshape(x.shape)
    return y.reshape(x.shape), r_out.reshape(x.shape)


def gated_rmsnorm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton `gated_rmsnorm_ref` over the last dim of `x` (and of the gate `z`, same shape)."""
    d = x.shape[-1]
    x2, z2 = _rows(x, d), _rows(z, d)
    y = torch.empty_like(x2)
    block = triton.next_power_of_2(d)
    launch = {"num_warps": _warps(block)} if x.is_cuda else {}
    _gated_rmsnorm_kernel[(x2.shape[0],)](
        x2, z2, weight, y, d, x2.stride(0), z2.stride(0), y.stride(0), eps, BLOCK=block, **launch
    )
    return y.reshape(x.shape)

"""RMSNorm kernels (fused residual add, plain, gated) vs their PyTorch references."""

from __future__ import annotations

import pytest
import torch

from fp4serve.ops.triton.rmsnorm import gated_rmsnorm, gated_rmsnorm_ref, rmsnorm, rmsnorm_ref


def _inputs(shape: tuple[int, ...], dtype: torch.dtype, device: str, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g) * 3).to(device=device, dtype=dtype) for _ in range(3)]


def _tol(dtype: torch.dtype, device: str) -> dict[str, float]:
    if dtype == torch.float32:
        return {"rtol": 1e-5, "atol": 1e-5}
    # bf16: one ulp on the GPU; the interpreter truncates fp32 -> bf16 at each rounding, so allow a few
    return {"rtol": 2**-7, "atol": 2**-7} if device == "cuda" else {"rtol": 2**-5, "atol": 2**-5}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 48), (2, 1, 130)])
def test_fused_add_rmsnorm(shape: tuple[int, ...], dtype: torch.dtype, device: str) -> None:
    x, r, w = _inputs(shape, dtype, device, shape[-1])
    w = w[(0,) * (len(shape) - 1)].float() * 0.1
    y, new_r = rmsnorm(x, w, 1e-6, r)
    y_ref, r_ref = rmsnorm_ref(x, w, 1e-6, r)
    torch.testing.assert_close(new_r, r_ref, **_tol(dtype, device))
    torch.testing.assert_close(y, y_ref, **_tol(dtype, device))
    torch.testing.assert_close(rmsnorm(x, w, 1e-6), rmsnorm_ref(x, w, 1e-6), **_tol(dtype, device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_rmsnorm(dtype: torch.dtype, device: str) -> None:
    x, z, w = _inputs((5, 3, 24), dtype, device, 1)
    w = w[0, 0].float()
    torch.testing.assert_close(gated_rmsnorm(x, z, w, 1e-6), gated_rmsnorm_ref(x, z, w, 1e-6), **_tol(dtype, device))


@pytest.mark.gpu
def test_gpu_norms_exact_27b_rows() -> None:
    x, r, z = _inputs((33, 5120), torch.bfloat16, "cuda", 2)
    w = torch.randn(5120, device="cuda") * 0.1
    y, new_r = rmsnorm(x, w, 1e-6, r)
    y_ref, r_ref = rmsnorm_ref(x, w, 1e-6, r)
    assert torch.equal(new_r, r_ref)
    # one bf16 ulp: the fp32 sum of squares is reduced in a different order than torch's mean
    torch.testing.assert_close(y, y_ref, rtol=2**-7, atol=0)
    xg, zg = x.view(-1, 128), z.view(-1, 128)
    wg = torch.randn(128, device="cuda")
    torch.testing.assert_close(gated_rmsnorm(xg, zg, wg, 1e-6), gated_rmsnorm_ref(xg, zg, wg, 1e-6), rtol=2**-7, atol=0)

"""RMSNorm (1 + w), gated RMSNorm (plain w, silu(z)) and L2 norm against elementwise float64 formulas."""

from __future__ import annotations

import math

import pytest
import torch

from fp4serve.ops.norm import gated_rms_norm, l2_norm, rms_norm


@pytest.mark.parametrize("shape", [(1, 5), (63, 3, 36), (7, 1000)], ids=lambda s: "x".join(map(str, s)))
def test_rms_norm_zero_centred(shape: tuple[int, ...]) -> None:
    x, w = torch.randn(shape) * 3, torch.randn(shape[-1])
    y = rms_norm(x, w, 1e-6)
    xd = x.double()
    ref = xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + w.double())
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-6)


def test_rms_norm_keeps_bf16_and_computes_in_fp32() -> None:
    x, w = torch.randn(4, 64).bfloat16(), torch.randn(64).bfloat16()
    y = rms_norm(x, w, 1e-6)
    assert y.dtype == torch.bfloat16
    ref = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + w.float())).bfloat16()
    assert torch.equal(y, ref)


@pytest.mark.parametrize("shape", [(1, 4, 24), (63, 3, 128)], ids=lambda s: "x".join(map(str, s)))
def test_gated_rms_norm_plain_weight(shape: tuple[int, ...]) -> None:
    x, z, w = torch.randn(shape), torch.randn(shape), torch.randn(shape[-1])
    y = gated_rms_norm(x, z, w, 1e-6)
    xd, zd = x.double(), z.double()
    ref = w.double() * xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * zd / (1 + torch.exp(-zd))
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-6)


def test_l2_norm() -> None:
    x = torch.randn(5, 3, 20)
    y = l2_norm(x)
    assert y.dtype == torch.float32
    ref = x.double() / torch.sqrt(x.double().pow(2).sum(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(y.double(), ref, rtol=1e-6, atol=1e-7)
    assert math.isclose(float(y[0, 0].norm()), 1.0, rel_tol=1e-5)

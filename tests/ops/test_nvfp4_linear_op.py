"""nvfp4_linear (public op) against nvfp4_linear_ref and against its definition, on awkward shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fp4serve.ops.nvfp4 import nvfp4_linear, nvfp4_linear_ref
from fp4serve.quant.nvfp4 import dequantize_weight, input_scale_from_amax, quant_dequant_activation, quantize_weight


@pytest.mark.parametrize("tokens", [1, 7, 63])
@pytest.mark.parametrize(("n", "k"), [(1, 16), (33, 48), (96, 272)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_public_op_matches_reference_and_definition(tokens: int, n: int, k: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(tokens * 1000 + n)
    w = torch.randn(n, k, generator=g) * 0.05
    x = (torch.randn(tokens, k, generator=g) * 2).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    q = quantize_weight(w)
    input_scale = input_scale_from_amax(x.abs().amax().float() * 0.5)
    w_dq = dequantize_weight(q.weight, q.weight_scale, q.weight_scale_2, dtype=dtype)
    for scale, x_used in ((None, x), (input_scale, quant_dequant_activation(x, input_scale))):
        ref = nvfp4_linear_ref(x, q.weight, q.weight_scale, q.weight_scale_2, bias, scale)
        out = nvfp4_linear(x, q.weight, q.weight_scale, q.weight_scale_2, bias, scale)
        assert out.dtype == dtype and out.shape == (tokens, n)
        assert torch.equal(out, ref)
        assert torch.equal(ref, F.linear(x_used, w_dq, bias))


def test_batched_leading_dims() -> None:
    q = quantize_weight(torch.randn(24, 32))
    x = torch.randn(2, 3, 32, dtype=torch.bfloat16)
    out = nvfp4_linear(x, q.weight, q.weight_scale, q.weight_scale_2)
    assert out.shape == (2, 3, 24)
    flat = nvfp4_linear(x.reshape(6, 32), q.weight, q.weight_scale, q.weight_scale_2)
    assert torch.equal(out.reshape(6, 24), flat)

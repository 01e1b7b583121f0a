"""The NVFP4 numerics give the same bits on a CUDA device as on the CPU (where they are checked against ModelOpt)."""

from __future__ import annotations

import pytest
import torch

from fp4serve.model.linear import NVFP4Linear
from fp4serve.quant.nvfp4 import dequantize_weight, input_scale_from_amax, quant_dequant_activation, quantize_weight


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_cuda_matches_cpu_bit_for_bit(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(256, 512, generator=g) / (torch.rand(256, 512, generator=g) + 1e-2)).to(dtype)
    w[3, :16] = 0
    cpu = quantize_weight(w)
    gpu = quantize_weight(w.cuda())
    assert torch.equal(gpu.weight.cpu(), cpu.weight)
    assert torch.equal(gpu.weight_scale.cpu().view(torch.uint8), cpu.weight_scale.view(torch.uint8))
    assert torch.equal(gpu.weight_scale_2.cpu(), cpu.weight_scale_2)
    for out in (torch.float32, dtype):
        deq = dequantize_weight(gpu.weight, gpu.weight_scale, gpu.weight_scale_2, out).cpu()
        assert torch.equal(deq, dequantize_weight(cpu.weight, cpu.weight_scale, cpu.weight_scale_2, out))
    x = (torch.randn(64, 512, generator=g) * torch.logspace(-6, 1, 64).unsqueeze(1)).to(dtype)
    scale = input_scale_from_amax(torch.tensor(3.0))
    assert torch.equal(quant_dequant_activation(x.cuda(), scale.cuda()).cpu(), quant_dequant_activation(x, scale))


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["w4a16", "w4a4"])
def test_linear_on_cuda_is_memory_lean_and_correct(mode: str) -> None:
    q = quantize_weight(torch.randn(128, 256, device="cuda"))
    layer = NVFP4Linear.from_quantized(
        q, input_scale=input_scale_from_amax(torch.tensor(4.0, device="cuda")), mode=mode
    )
    x = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16)
    out = layer(x)
    assert layer._cache is None
    x_used = x if mode == "w4a16" else quant_dequant_activation(x, layer.input_scale)
    ref = torch.nn.functional.linear(x_used, layer.dequantized_weight(torch.bfloat16))
    if mode == "w4a4":
        # the emulation path is the reference itself
        assert torch.equal(out, ref)
    else:
        # w4a16 runs the Triton NVFP4 GEMM: same weights, fp32 accumulation in another order, one bf16 rounding
        err = (out.float() - ref.float()).norm() / ref.float().norm()
        assert err < 1e-2, err

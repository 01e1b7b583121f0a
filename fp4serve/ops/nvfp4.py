"""NVFP4 linear op: y = x @ dequant(W).T + bias, weight-only (W4A16) or with W4A4 activation emulation.

`nvfp4_linear_ref` is the pure-PyTorch definition: dequantize the packed weight to the activation dtype (the way
vLLM's Marlin path computes on Hopper, where activations stay BF16) and, when an `input_scale` is given, first
quantize-dequantize the activations per 16-block (what Blackwell FP4 tensor cores compute). `nvfp4_linear` is the
public entry point; GPU kernels will be dispatched from it and tested against the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fp4serve.quant.nvfp4 import dequantize_weight, quant_dequant_activation


def nvfp4_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_scale_2: torch.Tensor,
    bias: torch.Tensor | None = None,
    input_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [..., K], weight uint8 [N, K/2], weight_scale fp8 [N, K/16], weight_scale_2 fp32 [] -> [..., N] in x.dtype."""
    w = dequantize_weight(weight, weight_scale, weight_scale_2, dtype=x.dtype)  # [N, K]
    if input_scale is not None:
        x = quant_dequant_activation(x, input_scale)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def nvfp4_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_scale_2: torch.Tensor,
    bias: torch.Tensor | None = None,
    input_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Public NVFP4 linear; input_scale given -> W4A4 emulation, else W4A16. Calls the reference for now."""
    return nvfp4_linear_ref(x, weight, weight_scale, weight_scale_2, bias, input_scale)

"""NVFP4 linear op: y = x @ dequant(W).T + bias, weight-only (W4A16) or with W4A4 activation emulation.

`nvfp4_linear_ref` is the pure-PyTorch definition: dequantize the packed weight to the activation dtype (the way
vLLM's Marlin path computes on Hopper, where activations stay BF16) and, when an `input_scale` is given, first
quantize-dequantize the activations per 16-block (what Blackwell FP4 tensor cores compute). `nvfp4_linear` is the
public entry point: for CUDA bf16/fp16 activations in W4A16 it runs `fp4serve.ops.triton.nvfp4_gemm` (FP4 unpack
and FP8 block scales in-kernel; GEMV / tensor-core split-K for decode, dequant + cuBLAS for prefill); everything
else (CPU, W4A4, other dtypes) runs the reference.

The kernels read the weight in a "half-split" packing (in each 16-element block the low nibbles hold elements 0..7
and the high nibbles 8..15) instead of the checkpoint's (even element in the low nibble). A caller that runs the
same weight many times prepares it once (`prepare_kernel_weight`) and passes the result as `kernel_weight`;
`checkpoint_packing` turns a half-split tensor back into the checkpoint's bytes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from fp4serve.ops.backend import use_kernels
from fp4serve.quant.nvfp4 import dequantize_weight, quant_dequant_activation

if TYPE_CHECKING:
    from fp4serve.ops.triton.nvfp4_gemm import NVFP4KernelWeight

KERNEL_DTYPES = (torch.bfloat16, torch.float16)


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


def kernel_eligible(x: torch.Tensor, input_scale: torch.Tensor | None = None) -> bool:
    """Whether `nvfp4_linear` runs the Triton GEMM for these activations (CUDA, bf16/fp16, weight-only)."""
    return input_scale is None and x.dtype in KERNEL_DTYPES and use_kernels(x)


def prepare_kernel_weight(
    weight: torch.Tensor, weight_scale: torch.Tensor, weight_scale_2: torch.Tensor
) -> NVFP4KernelWeight:
    """The checkpoint triple repacked (a new tensor) for the GEMM kernels; imports Triton."""
    from fp4serve.ops.triton.nvfp4_gemm import prepare_nvfp4_weight

    return prepare_nvfp4_weight(weight, weight_scale, weight_scale_2)


def checkpoint_packing(half_split: torch.Tensor) -> torch.Tensor:
    """Half-split packed bytes [N, K/2] -> the checkpoint's packing (even element in the low nibble)."""
    n, half_k = half_split.shape
    blocks = half_split.reshape(n, half_k // 8, 8)  # [N, G, 8]: byte j = element j | element j + 8 << 4
    codes = torch.cat((blocks & 0xF, blocks >> 4), dim=-1)  # [N, G, 16] in element order
    pairs = codes.reshape(n, half_k // 8, 8, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).reshape(n, half_k)


def nvfp4_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_scale_2: torch.Tensor,
    bias: torch.Tensor | None = None,
    input_scale: torch.Tensor | None = None,
    *,
    kernel_weight: NVFP4KernelWeight | None = None,
) -> torch.Tensor:
    """Public NVFP4 linear; input_scale given -> W4A4 emulation, else W4A16. `weight` is in the checkpoint's
    packing; `kernel_weight` (from `prepare_kernel_weight`) saves the repack on the GPU path."""
    if kernel_eligible(x, input_scale):
        from fp4serve.ops.triton.nvfp4_gemm import nvfp4_gemm

        kw = kernel_weight if kernel_weight is not None else prepare_kernel_weight(weight, weight_scale, weight_scale_2)
        return nvfp4_gemm(x, kw, None if bias is None else bias.to(x.dtype))
    return nvfp4_linear_ref(x, weight, weight_scale, weight_scale_2, bias, input_scale)

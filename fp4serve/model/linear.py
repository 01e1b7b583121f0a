"""`NVFP4Linear`: a Linear layer whose weight is stored in ModelOpt's NVFP4 layout; plain BF16 layers are nn.Linear.

The buffers carry the checkpoint's tensor names (`weight`, `weight_scale`, `weight_scale_2`, `input_scale`), so the
loader fills them by name. Two modes:
- `w4a16` (default): dequantize the weight and multiply in the activation dtype, like vLLM's Marlin path on Hopper.
- `w4a4`: additionally quantize-dequantize the activations per 16-block with the static `input_scale`, emulating
  Blackwell's FP4 tensor cores (vLLM's emulation backend); needs an `input_scale` from an NVFP4 (W4A4) checkpoint.

Dequantized-weight cache: dequantizing on every call keeps memory at 4.5 bits per weight but costs a full unpack per
forward, which dominates CPU decode time. `cache_dequantized=None` (the default) therefore caches the dequantized
weight only while the layer lives on the CPU (small demo models, where speed matters and memory does not) and stays
memory-lean on GPUs (where FP4 kernels will replace the dequantize). True/False force it either way. The cache is a
plain attribute, not a buffer: it never enters the state dict, and it is rebuilt whenever a buffer is replaced or
written in place (tracked through the tensors' identity and version counters), or the dtype/device changes.

GPU kernel weight: for CUDA bf16/fp16 activations in `w4a16` mode the forward runs the Triton NVFP4 GEMM, which reads
the packed bytes in its own "half-split" order. The first such forward repacks the `weight` buffer in place (same
size, so GPU memory stays at 4.5 bits per weight; no second copy) and remembers the buffer's identity and version.
Whatever needs the checkpoint's packing gets it back: `dequantized_weight`, the reference path (W4A4, other
dtypes), `state_dict()` (converted on the way out), and moving the module (`.to()`, `.cpu()`, ... restore the
checkpoint packing first). Writing the buffer (`load_quantized`, `load_state_dict`, an in-place copy by a loader)
bumps its version, which marks it as checkpoint-packed again. The repack must happen outside CUDA-graph capture
(the runner's warm-up forward does it).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fp4serve.ops.nvfp4 import checkpoint_packing, kernel_eligible, nvfp4_linear, prepare_kernel_weight
from fp4serve.quant.nvfp4 import BLOCK_SIZE, NVFP4Weight, dequantize_weight, quant_dequant_activation

LINEAR_MODES = ("w4a16", "w4a4")


class NVFP4Linear(nn.Module):
    """y = x @ W.T (+ bias) with W stored as packed E2M1 codes, FP8 block scales and an FP32 global scale."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        mode: str = "w4a16",
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        cache_dequantized: bool | None = None,
    ) -> None:
        super().__init__()
        if mode not in LINEAR_MODES:
            raise ValueError(f"NVFP4Linear mode {mode!r} is not one of {LINEAR_MODES}")
        if in_features <= 0 or out_features <= 0 or in_features % BLOCK_SIZE:
            raise ValueError(
                f"NVFP4Linear({in_features}, {out_features}): in_features must be a positive multiple of "
                f"{BLOCK_SIZE} and out_features positive"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.mode = mode
        self.dtype = dtype
        self.cache_dequantized = cache_dequantized
        n, k = out_features, in_features
        self.register_buffer("weight", torch.zeros(n, k // 2, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.ones(n, k // BLOCK_SIZE, device=device).to(torch.float8_e4m3fn))
        self.register_buffer("weight_scale_2", torch.zeros((), dtype=torch.float32, device=device))
        # 0 means "not loaded"; only the w4a4 mode reads it
        self.register_buffer("input_scale", torch.zeros((), dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(n, dtype=dtype, device=device) if bias else None)
        self._cache: torch.Tensor | None = None
        self._cache_key: tuple | None = None
        # set while `weight` holds the kernels' half-split packing (see the module docstring)
        self._kernel: Any = None
        self._kernel_key: tuple | None = None

    @classmethod
    def from_quantized(
        cls,
        q: NVFP4Weight,
        *,
        input_scale: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        mode: str = "w4a16",
        dtype: torch.dtype = torch.bfloat16,
        cache_dequantized: bool | None = None,
    ) -> NVFP4Linear:
        """Build a layer around an already quantized weight (e.g. from `quantize_weight`)."""
        out_features, half_k = q.weight.shape
        layer = cls(
            half_k * 2,
            out_features,
            bias=bias is not None,
            mode=mode,
            dtype=dtype,
            device=q.weight.device,
            cache_dequantized=cache_dequantized,
        )
        layer.load_quantized(q.weight, q.weight_scale, q.weight_scale_2, input_scale=input_scale, bias=bias)
        return layer

    @torch.no_grad()
    def load_quantized(
        self,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        weight_scale_2: torch.Tensor,
        *,
        input_scale: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> None:
        """Copy checked NVFP4 tensors into the buffers; ValueError on a wrong dtype/shape or a missing input_scale."""
        n, k = self.out_features, self.in_features
        expected = {
            "weight": (weight, torch.uint8, (n, k // 2)),
            "weight_scale": (weight_scale, torch.float8_e4m3fn, (n, k // BLOCK_SIZE)),
            "weight_scale_2": (weight_scale_2, torch.float32, ()),
        }
        if input_scale is not None:
            expected["input_scale"] = (input_scale, torch.float32, ())
        elif self.mode == "w4a4":
            raise ValueError("NVFP4Linear in w4a4 mode needs an input_scale (W4A16_NVFP4 checkpoints have none)")
        for name, (tensor, dtype, shape) in expected.items():
            # scalars may come as [] or [1]
            shape_ok = tensor.numel() == 1 if shape == () else tuple(tensor.shape) == shape
            if tensor.dtype != dtype or not shape_ok:
                raise ValueError(
                    f"NVFP4Linear {name}: expected {dtype} of shape {list(shape)}, got {tensor.dtype} of shape "
                    f"{list(tensor.shape)}"
                )
            getattr(self, name).copy_(tensor.reshape(shape))
        self._kernel = None
        if bias is not None:
            if self.bias is None or tuple(bias.shape) != (n,):
                raise ValueError(f"NVFP4Linear bias: expected shape [{n}] on a layer built with bias=True")
            self.bias.copy_(bias)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as a dense [out_features, in_features] tensor in `dtype` (default: the layer dtype)."""
        return dequantize_weight(
            self.checkpoint_weight(), self.weight_scale, self.weight_scale_2, dtype=dtype or self.dtype
        )

    def checkpoint_weight(self) -> torch.Tensor:
        """The packed weight in the checkpoint's packing (a converted copy while the buffer holds the kernels')."""
        return checkpoint_packing(self.weight) if self._kernel_packed() else self.weight

    def _buffer_key(self) -> tuple:
        return id(self.weight), self.weight.data_ptr(), _version(self.weight)

    def _kernel_packed(self) -> bool:
        if self._kernel is not None and self._kernel_key != self._buffer_key():
            # the buffer was written or replaced since the repack: it holds checkpoint bytes again
            self._kernel = None
        return self._kernel is not None

    @torch.no_grad()
    def kernel_weight(self) -> Any:
        """The GEMM kernels' view of this layer (repacks the buffer in place on first use; CUDA only)."""
        if self._kernel_packed():
            return self._kernel
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("NVFP4Linear: run one forward before CUDA-graph capture (the weight is repacked then)")
        kw = prepare_kernel_weight(self.weight, self.weight_scale, self.weight_scale_2)
        self.weight.copy_(kw.weight)
        self._kernel = replace(kw, weight=self.weight)
        self._kernel_key = self._buffer_key()
        return self._kernel

    @torch.no_grad()
    def restore_checkpoint_packing(self) -> None:
        """Undo the in-place repack (the buffer holds the checkpoint's bytes afterwards)."""
        if self._kernel_packed():
            self.weight.copy_(checkpoint_packing(self.weight))
        self._kernel = self._kernel_key = None

    def _apply(self, fn: Any, recurse: bool = True) -> NVFP4Linear:
        # moves and casts replace the buffers: hand them over in the checkpoint's packing
        self.restore_checkpoint_packing()
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._kernel_packed():
            destination[prefix + "weight"] = checkpoint_packing(self.weight)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "weight" in state_dict:
            self._kernel = self._kernel_key = None

    def _cached_weight(self, dtype: torch.dtype) -> torch.Tensor | None:
        enabled = self.cache_dequantized
        if enabled is None:
            enabled = self.weight.device.type == "cpu"
        if not enabled:
            self._cache = self._cache_key = None
            return None
        tensors = (self.weight, self.weight_scale, self.weight_scale_2)
        key = (dtype, self.weight.device, self._kernel_packed(), *((id(t), t.data_ptr(), _version(t)) for t in tensors))
        if self._cache_key != key:
            self._cache = self.dequantized_weight(dtype)
            self._cache_key = key
        return self._cache

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_scale = self.input_scale if self.mode == "w4a4" else None
        # an explicit cache_dequantized=True keeps the dense path on the GPU too
        if self.cache_dequantized is not True and kernel_eligible(x, input_scale):
            kw = self.kernel_weight()
            return nvfp4_linear(x, self.weight, self.weight_scale, self.weight_scale_2, self.bias, kernel_weight=kw)
        w = self._cached_weight(x.dtype)
        if w is None:
            return nvfp4_linear(
                x, self.checkpoint_weight(), self.weight_scale, self.weight_scale_2, self.bias, input_scale
            )
        if input_scale is not None:
            x = quant_dequant_activation(x, input_scale)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"mode={self.mode}"
        )


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:
        # inference tensors keep no version counter: identity and address only
        return None

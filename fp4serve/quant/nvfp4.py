"""NVFP4 numerics: the E2M1 element grid, two-level (FP8 block + FP32 tensor) scaling, packing, and W4A4 emulation.

Pure functions on tensors, no I/O. Every rounding step is ordered exactly as nvidia-modelopt 0.47 computes it
(`NVFP4QTensor.quantize` / `.dequantize`), so a weight quantized here has the same bytes as a ModelOpt export; the
tests check that bit for bit. The math is written out in ../shared/docs/nvfp4_format.md (sections 1, 2 and 8):

- weight_scale_2 = amax(W) / (6 * 448), an fp32 scalar (or a shared value for a fused group such as q/k/v);
- weight_scale   = fp8_e4m3(clamp(block_amax / (6 * weight_scale_2), 2^-9, 448)), 1.0 for all-zero blocks;
- codes          = E2M1 round-to-nearest-even of W / (float(weight_scale) * weight_scale_2), saturating at +-6,
  two per byte with the even element in the low nibble.

One deliberate difference: ModelOpt turns an all-zero tensor into NaN scales (0/0); here it becomes codes 0,
block scales 1.0 and weight_scale_2 0.0, which dequantizes to exact zeros.

Activation quantization for W4A4 emulation follows vLLM's `ref_nvfp4_quant_dequant` operation for operation (the
reference vLLM runs when it emulates Blackwell FP4 GEMMs), see `quant_dequant_activation`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

E2M1_MAX = 6.0
E4M3_MAX = 448.0
BLOCK_SIZE = 16
# the smallest positive float8_e4m3fn value (a subnormal); block scales are clamped to it, never flushed to 0
E4M3_MIN_SCALE = 2.0**-9

# value of each 4-bit code; bit 3 is the sign. Code 8 ("-0") decodes to +0.0 as in ModelOpt's table, so dequantized
# weights match ModelOpt's bit for bit (the sign of a zero never changes a matmul result)
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)

# (bound, inclusive): |x| > bound (>= bound when inclusive) moves one code up. Ties at 0.25, 1.25, 2.5, 5.0 stay on
# the even code below; ties at 0.75, 1.75, 3.5 go to the even code above.
_E2M1_STEPS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))


@dataclass(frozen=True)
class NVFP4Weight:
    """A quantized linear weight in ModelOpt's on-disk layout."""

    weight: torch.Tensor  # uint8 [N, K/2], two E2M1 codes per byte
    weight_scale: torch.Tensor  # float8_e4m3fn [N, K/16]
    weight_scale_2: torch.Tensor  # float32 0-d


def cast_to_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round already-scaled values to E2M1 codes 0..15 (uint8): nearest, ties to even, saturating at +-6.

    The sign bit is set for every x < 0 (so tiny negatives become code 8, -0), not for -0.0 itself, as in ModelOpt.
    NaN maps to code 0; callers reject non-finite input before scaling.
    """
    mag = x.abs()
    codes = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for bound, inclusive in _E2M1_STEPS:
        codes += (mag >= bound) if inclusive else (mag > bound)
    codes |= (x < 0).to(torch.uint8) << 3
    return codes


def e2m1_table(device: torch.device | str) -> torch.Tensor:
    """The 16 E2M1 values (float32, `E2M1_VALUES`), built on `device` from arange with no host-to-device copy, so
    decoding is allowed inside CUDA-graph capture. Code 8 (-0) decodes to +0, as ModelOpt's table does."""
    codes = torch.arange(16, device=device)
    exponent, mantissa = (codes & 7) >> 1, (codes & 1).float()
    magnitude = torch.where(exponent == 0, 0.5 * mantissa, (1.0 + 0.5 * mantissa) * torch.exp2(exponent.float() - 1))
    return torch.where(codes >= 8, -magnitude, magnitude) + 0.0


def e2m1_to_float(codes: torch.Tensor) -> torch.Tensor:
    """Decode E2M1 codes (uint8, 0..15) to float32 values."""
    return e2m1_table(codes.device)[codes.long()]


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """Pack codes [..., K] into bytes [..., K/2]: element 2j in the low nibble, element 2j+1 in the high nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"cannot pack {codes.shape[-1]} E2M1 codes into bytes: the last dimension must be even")
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_e2m1`: bytes [..., K/2] -> codes [..., K]."""
    pairs = torch.stack((packed & 0x0F, packed >> 4), dim=-1)  # [..., K/2, 2]
    return pairs.reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def global_scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """Per-tensor (dequant-direction) scale amax / (6 * 448) as a float32 0-d tensor: `weight_scale_2`."""
    return (amax.float() / (E2M1_MAX * E4M3_MAX)).reshape(())


def input_scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """Static activation scale amax_x / (6 * 448) (ModelOpt `input_scale`); amax must be finite and positive."""
    value = float(amax)
    if not (value > 0 and value != float("inf")):
        raise ValueError(f"activation amax must be finite and positive to make an input_scale, got {value}")
    return global_scale_from_amax(amax)


def _check_quantizable(w: torch.Tensor, name: str) -> torch.Tensor:
    """Raise ValueError for tensors NVFP4 cannot hold; return amax(|w|) (float32 0-d), which the check needs."""
    if not w.is_floating_point():
        raise ValueError(f"{name}: cannot quantize a {w.dtype} tensor to NVFP4, it must be floating point")
    if w.ndim == 0 or w.numel() == 0:
        raise ValueError(f"{name}: cannot quantize an empty tensor (shape {tuple(w.shape)}) to NVFP4")
    if w.shape[-1] % BLOCK_SIZE:
        raise ValueError(
            f"{name}: last dimension {w.shape[-1]} (shape {tuple(w.shape)}) is not a multiple of the NVFP4 "
            f"block size {BLOCK_SIZE}"
        )
    # amax propagates NaN and Inf, so one reduction both checks finiteness and yields the global amax
    amax = w.abs().amax().float()
    if not bool(torch.isfinite(amax)):
        bad = int((~torch.isfinite(w)).sum())
        raise ValueError(f"{name}: contains {bad} non-finite values (NaN or Inf); NVFP4 cannot represent them")
    return amax


def _check_global_scale(weight_scale_2: torch.Tensor, amax: torch.Tensor, name: str) -> torch.Tensor:
    if weight_scale_2.numel() != 1:
        raise ValueError(f"{name}: weight_scale_2 must be a scalar, got shape {tuple(weight_scale_2.shape)}")
    ws2 = weight_scale_2.detach().float().reshape(()).to(amax.device)
    value = float(ws2)
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"{name}: weight_scale_2 must be finite and non-negative, got {value}")
    if value == 0 and float(amax) != 0:
        raise ValueError(f"{name}: weight_scale_2 is 0 but the tensor is not all zero")
    return ws2


def quantize_weight(
    w: torch.Tensor, *, name: str = "weight", weight_scale_2: torch.Tensor | None = None
) -> NVFP4Weight:
    """Quantize a weight [..., K] (bf16/fp16/fp32) to NVFP4 exactly as ModelOpt's export does.

    weight_scale_2=None derives the global scale from this tensor's amax; pass the shared scale of a fused group
    (q/k/v, gate/up: amax over the group / 2688) to get the bytes ModelOpt writes for each member. `name` appears
    in the ValueError raised for tensors that cannot be quantized.
    """
    w = w.detach()
    amax = _check_quantizable(w, name)
    if weight_scale_2 is None:
        ws2 = global_scale_from_amax(amax)
    else:
        ws2 = _check_global_scale(weight_scale_2, amax, name)
    k = w.shape[-1]
    blocks = w.reshape(*w.shape[:-1], k // BLOCK_SIZE, BLOCK_SIZE)  # [..., K/16, 16]
    block_amax = blocks.abs().amax(dim=-1).float()  # [..., K/16]
    ratio = block_amax / (ws2 * E2M1_MAX)
    # a zero ratio (all-zero block, or an fp32 underflow) gets scale 1.0, as in ModelOpt; block_amax == 0 also
    # catches 0/0 when the whole tensor is zero
    ratio = torch.where((ratio == 0) | (block_amax == 0), torch.ones_like(ratio), ratio)
    weight_scale = ratio.clamp(E4M3_MIN_SCALE, E4M3_MAX).to(torch.float8_e4m3fn)
    if float(ws2) == 0:
        codes = torch.zeros(w.shape, dtype=torch.uint8, device=w.device)
    else:
        denom = weight_scale.float() * ws2  # [..., K/16]
        scaled = blocks.float() / denom.unsqueeze(-1)  # [..., K/16, 16]
        codes = cast_to_e2m1(scaled).reshape(w.shape)
    return NVFP4Weight(weight=pack_e2m1(codes), weight_scale=weight_scale, weight_scale_2=ws2)


def _check_packed(weight: torch.Tensor, weight_scale: torch.Tensor, weight_scale_2: torch.Tensor) -> None:
    if weight.dtype != torch.uint8:
        raise ValueError(f"NVFP4 weight must be uint8 (packed E2M1), got {weight.dtype}")
    if weight_scale.dtype != torch.float8_e4m3fn:
        raise ValueError(f"NVFP4 weight_scale must be float8_e4m3fn, got {weight_scale.dtype}")
    if weight_scale_2.numel() != 1:
        raise ValueError(f"NVFP4 weight_scale_2 must be a scalar, got shape {tuple(weight_scale_2.shape)}")
    expected = (*weight.shape[:-1], weight.shape[-1] * 2 // BLOCK_SIZE)
    if weight.ndim == 0 or (weight.shape[-1] * 2) % BLOCK_SIZE or tuple(weight_scale.shape) != expected:
        raise ValueError(
            f"NVFP4 weight shape {tuple(weight.shape)} and weight_scale shape {tuple(weight_scale.shape)} do not "
            f"match (expected weight [N, K/2] and weight_scale [N, K/16] with K a multiple of {BLOCK_SIZE})"
        )


def dequantize_weight(
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_scale_2: torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Unpack and scale an NVFP4 weight to [..., K] in `dtype`: e2m1(code) * (float(weight_scale) * weight_scale_2).

    Computed in fp32 in ModelOpt's order (block scale times global scale first, then times the element; only that
    product rounds) and cast to `dtype` at the end, so the result equals `NVFP4QTensor.dequantize` bit for bit.
    """
    _check_packed(weight, weight_scale, weight_scale_2)
    # one lookup per byte gives both nibbles' values at once
    byte_values = e2m1_table(weight.device)
    lut = torch.stack((byte_values.repeat(16), byte_values.repeat_interleave(16)), dim=-1)  # [256, 2]
    values = lut[weight.long()]  # [..., K/2, 2]
    k = weight.shape[-1] * 2
    values = values.reshape(*weight.shape[:-1], k // BLOCK_SIZE, BLOCK_SIZE)  # [..., K/16, 16]
    block = weight_scale.float() * weight_scale_2.float().reshape(()).to(weight.device)  # [..., K/16]
    return (values * block.unsqueeze(-1)).reshape(*weight.shape[:-1], k).to(dtype)


def quant_dequant_activation(x: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """W4A4 emulation: quantize activations [..., K] to NVFP4 per 16-block with the static input_scale, dequantize.

    Same operations, in the same fp32 order, as vLLM's `ref_nvfp4_quant_dequant` with gs = 1 / input_scale (the
    format doc writes o = gs / s, which is the same value up to fp32 rounding):
    s = fp8(clamp(gs * (block_amax * (1/6)), +-448)); o = 1 / (s * (1/gs)) (0 where s is 0);
    q = E2M1(clamp(x * o, +-6)); x_hat = q * (s / gs), cast back to x.dtype. Blocks beyond the calibrated amax
    saturate (scale 448, codes +-6) and blocks whose scale underflows fp8 flush to zero, as on Blackwell.
    """
    k = x.shape[-1]
    if k % BLOCK_SIZE:
        raise ValueError(f"activation last dimension {k} is not a multiple of the NVFP4 block size {BLOCK_SIZE}")
    gs = 1.0 / input_scale.float().reshape(())
    inv_gs = 1.0 / gs
    blocks = x.reshape(*x.shape[:-1], k // BLOCK_SIZE, BLOCK_SIZE)  # [..., K/16, 16]
    block_amax = blocks.abs().amax(dim=-1, keepdim=True).float()  # [..., K/16, 1]
    scale = gs * (block_amax * torch.tensor(1.0 / E2M1_MAX, dtype=torch.float32, device=x.device))
    scale = scale.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()
    step = scale * inv_gs
    out_scale = torch.where(step == 0, torch.zeros_like(step), 1.0 / step)
    scaled = (blocks.float() * out_scale).clamp(-E2M1_MAX, E2M1_MAX)
    values = e2m1_to_float(cast_to_e2m1(scaled))
    return (values * (scale / gs)).reshape(x.shape).to(x.dtype)

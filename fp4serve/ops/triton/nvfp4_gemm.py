"""NVFP4 weight-only GEMM (W4A16): `y = x @ dequant(W).T` with the FP4 unpack and FP8 block scales done in-kernel.

Two paths, chosen by the number of activation rows M:
- small M (decode): `_nvfp4_gemm_kernel` streams the packed weight once, dequantizes each [BLOCK_N, BLOCK_K] tile
  in registers and multiplies it on the tensor cores with the weight as the left operand ("swap AB": the weight
  rows fill the MMA's 64-wide M side, the few activation rows its narrow N side). When there are too few output
  tiles to fill the GPU it splits K, writes fp32 partials and sums them in `_splitk_reduce_kernel` (deterministic,
  no atomics). Decode is bandwidth-bound, so every weight byte is read exactly once.
- large M (prefill): `_nvfp4_dequant_kernel` writes the bf16 weight (exactly the reference numerics) and cuBLAS
  does the matmul. The transient dequant costs one extra pass over N*K*2 bytes, small next to the 2*M*N*K FLOPs,
  and cuBLAS is the fastest bf16 GEMM there is on Hopper (Hopper has no FP4 tensor cores).

E2M1 decode without a lookup table: the 3 magnitude bits of a nibble are placed in the lowest exponent bits and the
top mantissa bit of an fp32, and the sign bit in the fp32 sign. That float equals `v * 2**-126` exactly (code 1,
|v| = 0.5, becomes the subnormal 2**-127, which fp32 multiplies keep: Triton emits no flush-to-zero there). One
multiply by `scale * 2**110` then gives `v * scale * 2**-16`, exact in bf16 (at most 6 significant bits, far from
the bf16 range limits); the `2**16` and `weight_scale_2` are applied once to the fp32 accumulator.

The weight layout is the checkpoint's (uint8 [N, K/2], low nibble = even k; float8_e4m3fn [N, K/16]);
`prepare_nvfp4_weight` only validates it and makes it contiguous. K must be a multiple of 16.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
# path boundaries by activation rows (measured crossovers on H100, see docs/kernels.md)
GEMV_MAX_M = 1
DENSE_MIN_M = 64

_SUBNORMAL_UNFOLD = tl.constexpr(2.0**126)
_SUBNORMAL_TO_F16 = tl.constexpr(2.0**120)
_F16_UNFOLD = tl.constexpr(2.0**6)
_X_TO_F16 = tl.constexpr(2.0**-4)
_MMA_UNFOLD = tl.constexpr(2.0**10)


@dataclass(frozen=True)
class NVFP4KernelWeight:
    """One NVFP4 linear weight in the layout the kernels read (see `prepare_nvfp4_weight`)."""

    weight: torch.Tensor  # [N, K/2] uint8, half-split: byte 8g+b = code(16g+b) | code(16g+8+b) << 4
    weight_scale: torch.Tensor  # [N, K/16] float8_e4m3fn
    weight_scale_2: torch.Tensor  # [1] float32
    out_features: int
    in_features: int


@dataclass(frozen=True)
class GemmConfig:
    """Which path runs ("gemv": one row on CUDA cores; "mma": tensor cores; "dense": dequant + cuBLAS) and how."""

    kind: str
    block_m: int = 16
    block_n: int = 64
    block_k: int = 256
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    use_asm: bool = True
    swap_ab: bool = True
    prefetch: bool = False
    x_bcast: bool = False


def _check_nvfp4(weight: torch.Tensor, weight_scale: torch.Tensor, weight_scale_2: torch.Tensor) -> tuple[int, int]:
    if weight.dtype != torch.uint8 or weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D uint8 tensor, got {weight.dtype} {tuple(weight.shape)}")
    n, k = weight.shape[0], weight.shape[1] * 2
    if k % 16 != 0:
        raise ValueError(f"weight: in_features {k} is not a multiple of 16")
    if weight_scale.dtype != torch.float8_e4m3fn or tuple(weight_scale.shape) != (n, k // 16):
        got = f"{weight_scale.dtype} {tuple(weight_scale.shape)}"
        raise ValueError(f"weight_scale: expected float8_e4m3fn {(n, k // 16)}, got {got}")
    if weight_scale_2.numel() != 1:
        raise ValueError(f"weight_scale_2: expected one value, got shape {tuple(weight_scale_2.shape)}")
    return n, k


def unpack_codes(weight: torch.Tensor) -> torch.Tensor:
    """Checkpoint packing (low nibble = even k) -> E2M1 codes [N, K] uint8."""
    return torch.stack([weight & 0xF, weight >> 4], dim=-1).reshape(weight.shape[0], -1)


def prepare_nvfp4_weight(
    weight: torch.Tensor, weight_scale: torch.Tensor, weight_scale_2: torch.Tensor
) -> NVFP4KernelWeight:
    """Validate a ModelOpt NVFP4 weight triple and repack it once, at load time, for the kernels.

    Half-split packing: in each 16-element block the low nibbles hold elements 0..7 and the high nibbles 8..15, so
    one unpacked byte row gives two runs of 8 consecutive k. The tensor-core fragments then take two adjacent bytes
    per thread, and activations are read contiguously. Same size as the checkpoint tensor.
    """
    n, k = _check_nvfp4(weight, weight_scale, weight_scale_2)
    codes = unpack_codes(weight).reshape(n, k // 16, 2, 8)  # [N, G, half, 8]
    repacked = (codes[:, :, 0, :] | (codes[:, :, 1, :] << 4)).reshape(n, k // 2)
    return NVFP4KernelWeight(
        weight=repacked.contiguous(),
        weight_scale=weight_scale.contiguous(),
        weight_scale_2=weight_scale_2.detach().reshape(1).to(device=weight.device, dtype=torch.float32),
        out_features=n,
        in_features=k,
    )


def nvfp4_dequant_ref(
    weight: torch.Tensor, weight_scale: torch.Tensor, weight_scale_2: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Reference dequant (nvfp4_format.md §8) of a checkpoint triple: LUT[nibble] * (float(scale) * weight_scale_2)."""
    n, k = _check_nvfp4(weight, weight_scale, weight_scale_2)
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=weight.device)
    block = weight_scale.to(torch.float32) * weight_scale_2.to(torch.float32).reshape(())  # [N, K/16]
    return (lut[unpack_codes(weight).long()] * block.repeat_interleave(16, dim=1)).to(dtype)


def nvfp4_gemm_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_scale_2: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference W4A16 linear: dequantize to x's dtype, then an ordinary matmul."""
    y = x @ nvfp4_dequant_ref(weight, weight_scale, weight_scale_2, x.dtype).T
    return y if bias is None else y + bias


_E4M3_UNPACK_ASM = tl.constexpr(
    """
{
.reg .b32 t, s, e, o;
.reg .b16 e0, e1, o0, o1;
shl.b32 t, $4, 2;
and.b32 t, t, 0x1C1C1C1C;
shl.b32 s, $4, 4;
and.b32 s, s, 0x80808080;
or.b32 e, t, s;
shr.b32 t, $4, 2;
and.b32 t, t, 0x1C1C1C1C;
and.b32 s, $4, 0x80808080;
or.b32 o, t, s;
mov.b32 {e0, e1}, e;
mov.b32 {o0, o1}, o;
cvt.rn.f16x2.e4m3x2 $0, e0;
cvt.rn.f16x2.e4m3x2 $1, e1;
cvt.rn.f16x2.e4m3x2 $2, o0;
cvt.rn.f16x2.e4m3x2 $3, o1;
}
"""
)


@triton.jit
def _unpack_e2m1_raw(b):
    # b: uint32 holding one byte; returns v * 2**-126 of the low and of the high nibble (fp32 bit placement)
    lo = ((b & 0x7) << 22) | ((b & 0x8) << 28)
    hi = ((b & 0x70) << 18) | ((b & 0x80) << 24)
    return lo.to(tl.float32, bitcast=True), hi.to(tl.float32, bitcast=True)


@triton.jit
def _unpack_e2m1_f16(wb, USE_ASM: tl.constexpr):
    # wb: uint8 tile; returns v * 2**-6 as fp16 for the low and the high nibble of every byte (exact).
    # GPU: each nibble becomes an e4m3 byte (magnitude bits to bits 2..4, sign to bit 7: an e4m3 with that bit
    # pattern is exactly v * 2**-6, the subnormal too), four bytes per instruction, then the hardware converts
    # e4m3 pairs to f16 pairs. Interpreter: the same numbers through fp32 bit placement.
    if USE_ASM:
        lo, hi = tl.inline_asm_elementwise(
            _E4M3_UNPACK_ASM, "=r,=r,=r,=r,r", [wb], dtype=(tl.float16, tl.float16), is_pure=True, pack=4
        )
    else:
        lo, hi = _unpack_e2m1_raw(wb.to(tl.uint32))
        lo = (lo * _SUBNORMAL_TO_F16).to(tl.float16)
        hi = (hi * _SUBNORMAL_TO_F16).to(tl.float16)
    return lo, hi


@triton.jit
def _gemv_tile(w_rows, s_rows, x_ptr, k0, k_hi, n_ok, offs_n, offs_g, offs_j, X_BCAST: tl.constexpr):
    g_ok = (k0 + offs_g * 16) < k_hi  # [G]
    byte_idx = k0 // 2 + offs_g[:, None] * 8 + offs_j[None, :]  # [G, 8]
    wb = tl.load(w_rows + byte_idx[None, :, :], mask=n_ok[:, None, None] & g_ok[None, :, None], other=0)
    sc = tl.load(s_rows + (k0 // 16 + offs_g)[None, :], mask=n_ok[:, None] & g_ok[None, :], other=0)
    k_first = k0 + offs_g[:, None] * 16 + offs_j[None, :]  # [G, 8]: k of the low nibbles
    if X_BCAST:
        # activations loaded per weight row ([BN, G, 8], L1 hits) in the weight tile's own register layout: no
        # shared-memory layout conversion and no barrier per iteration
        x_idx = k_first[None, :, :] + 0 * offs_n[:, None, None]
        x_ok = (g_ok[None, :, None] & (offs_j < 8)[None, None, :]) & (offs_n >= 0)[:, None, None]
    else:
        x_idx = k_first
        x_ok = g_ok[:, None] & (offs_j < 8)[None, :]
    x_lo = tl.load(x_ptr + x_idx, mask=x_ok, other=0.0)
    x_hi = tl.load(x_ptr + x_idx + 8, mask=x_ok, other=0.0)
    return wb, sc, x_lo, x_hi


@triton.jit
def _gemv_row_update(acc, wb, sc, x_lo, x_hi, USE_ASM: tl.constexpr, X_BCAST: tl.constexpr):
    lo, hi = _unpack_e2m1_f16(wb, USE_ASM)
    if X_BCAST:
        part = tl.sum(lo.to(tl.float32) * x_lo.to(tl.float32) + hi.to(tl.float32) * x_hi.to(tl.float32), axis=2)
    else:
        xl = x_lo.to(tl.float32)[None, :, :]
        xh = x_hi.to(tl.float32)[None, :, :]
        part = tl.sum(lo.to(tl.float32) * xl + hi.to(tl.float32) * xh, axis=2)
    return acc + part * sc.to(tl.float8e4nv, bitcast=True).to(tl.float32)


@triton.jit
def _nvfp4_gemv_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    gs_ptr,
    out_ptr,
    N,
    K,
    stride_split,
    k_per_split,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_ASM: tl.constexpr,
    PREFETCH: tl.constexpr,
    X_BCAST: tl.constexpr,
):
    # one activation row on CUDA cores: fp32 partial sums per 16-block, one scale multiply per block. PREFETCH
    # issues the next tile's loads before the current tile's math: decode is bound by bytes in flight per SM.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    G: tl.constexpr = BLOCK_K // 16
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_g = tl.arange(0, G)
    offs_j = tl.arange(0, 8)
    n_ok = offs_n < N
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None, None] * (K // 2)  # [BN, 1, 1]
    s_rows = s_ptr + offs_n.to(tl.int64)[:, None] * (K // 16)  # [BN, 1]
    acc = tl.zeros((BLOCK_N, G), dtype=tl.float32)
    if PREFETCH:
        wb_n, sc_n, xl_n, xh_n = _gemv_tile(w_rows, s_rows, x_ptr, k_lo, k_hi, n_ok, offs_n, offs_g, offs_j, X_BCAST)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            wb, sc, x_lo, x_hi = wb_n, sc_n, xl_n, xh_n
            wb_n, sc_n, xl_n, xh_n = _gemv_tile(
                w_rows, s_rows, x_ptr, k0 + BLOCK_K, k_hi, n_ok, offs_n, offs_g, offs_j, X_BCAST
            )
            acc = _gemv_row_update(acc, wb, sc, x_lo, x_hi, USE_ASM, X_BCAST)
    else:
        for k0 in range(k_lo, k_hi, BLOCK_K):
            wb, sc, x_lo, x_hi = _gemv_tile(w_rows, s_rows, x_ptr, k0, k_hi, n_ok, offs_n, offs_g, offs_j, X_BCAST)
            acc = _gemv_row_update(acc, wb, sc, x_lo, x_hi, USE_ASM, X_BCAST)
    y = tl.sum(acc, axis=1) * (tl.load(gs_ptr) * _F16_UNFOLD)
    tl.store(out_ptr + pid_k * stride_split + offs_n, y.to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _nvfp4_gemm_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    gs_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_om,
    stride_split,
    k_per_split,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr,
    USE_ASM: tl.constexpr,
    SWAP_AB: tl.constexpr,
):
    # tensor cores, fp16 operands: the weight tile as v * s * 2**-6 (exact), activations as x * 2**-4
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    G: tl.constexpr = BLOCK_K // 16
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_g = tl.arange(0, G)
    offs_j = tl.arange(0, 8)
    offs_h = tl.arange(0, BLOCK_K // 2)
    k_half = (offs_h // 8) * 16 + offs_h % 8  # k of the low nibble of byte h of the tile
    n_ok = offs_n < N
    m_ok = offs_m < M
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None, None] * (K // 2)  # [BN, 1, 1]
    s_rows = s_ptr + offs_n.to(tl.int64)[:, None] * (K // 16)  # [BN, 1]
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm  # [BM, 1]
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        g_ok = (k0 + offs_g * 16) < k_hi
        byte_idx = k0 // 2 + offs_g[:, None] * 8 + offs_j[None, :]  # [G, 8]
        wb = tl.load(w_rows + byte_idx[None, :, :], mask=n_ok[:, None, None] & g_ok[None, :, None], other=0)
        sc = tl.load(s_rows + (k0 // 16 + offs_g)[None, :], mask=n_ok[:, None] & g_ok[None, :], other=0)
        sc = sc.to(tl.float8e4nv, bitcast=True).to(tl.float16)[:, :, None]  # [BN, G, 1]
        lo, hi = _unpack_e2m1_f16(wb, USE_ASM)
        # v * s * 2**-6: exact in fp16 (at most 6 significant bits, lsb >= 2**-16)
        w_lo = tl.reshape(lo * sc, (BLOCK_N, BLOCK_K // 2))  # k = 16g + j
        w_hi = tl.reshape(hi * sc, (BLOCK_N, BLOCK_K // 2))  # k = 16g + 8 + j
        k_idx = k0 + k_half
        x_ok = m_ok[:, None] & (k_idx[None, :] < k_hi)
        x_lo = tl.load(x_rows + k_idx[None, :], mask=x_ok, other=0.0).to(tl.float32)  # [BM, BK/2]
        x_hi = tl.load(x_rows + k_idx[None, :] + 8, mask=x_ok, other=0.0).to(tl.float32)
        # x * 2**-4 is exact in fp16 for 2**-12 <= |x| <= 2**20 (bf16 has 8 significant bits); larger values are
        # clamped rather than turned into inf
        x_lo = tl.minimum(tl.maximum(x_lo * _X_TO_F16, -65504.0), 65504.0)
        x_hi = tl.minimum(tl.maximum(x_hi * _X_TO_F16, -65504.0), 65504.0)
        if DOT_FP32:
            w_lo = w_lo.to(tl.float32)
            w_hi = w_hi.to(tl.float32)
            if SWAP_AB:
                acc += tl.dot(w_lo, tl.trans(x_lo), input_precision="ieee")
                acc += tl.dot(w_hi, tl.trans(x_hi), input_precision="ieee")
            else:
                acc += tl.dot(x_lo, tl.trans(w_lo), input_precision="ieee")
                acc += tl.dot(x_hi, tl.trans(w_hi), input_precision="ieee")
        else:
            if SWAP_AB:
                acc = tl.dot(w_lo, tl.trans(x_lo.to(tl.float16)), acc)
                acc = tl.dot(w_hi, tl.trans(x_hi.to(tl.float16)), acc)
            else:
                acc = tl.dot(x_lo.to(tl.float16), tl.trans(w_lo), acc)
                acc = tl.dot(x_hi.to(tl.float16), tl.trans(w_hi), acc)
    acc = acc * (tl.load(gs_ptr) * _MMA_UNFOLD)
    if SWAP_AB:
        out = out_ptr + pid_k * stride_split + offs_m[None, :] * stride_om + offs_n[:, None]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=n_ok[:, None] & m_ok[None, :])
    else:
        out = out_ptr + pid_k * stride_split + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _splitk_reduce_kernel(p_ptr, out_ptr, numel, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT):
        acc += tl.load(p_ptr + s * numel + offs, mask=ok, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _nvfp4_dequant_kernel(
    w_ptr, s_ptr, gs_ptr, out_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CONCAT: tl.constexpr
):
    # program_id(0) walks K so that neighbouring programs write neighbouring columns of the same rows
    G: tl.constexpr = BLOCK_K // 16
    k0 = tl.program_id(0) * BLOCK_K
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_g = tl.arange(0, G)
    offs_j = tl.arange(0, 8)
    rows = offs_n.to(tl.int64)
    ok2 = (offs_n < N)[:, None] & ((k0 + offs_g * 16) < K)[None, :]  # [BN, G]
    byte_idx = k0 // 2 + offs_g[:, None] * 8 + offs_j[None, :]
    wb = tl.load(w_ptr + rows[:, None, None] * (K // 2) + byte_idx[None, :, :], mask=ok2[:, :, None], other=0)
    sc = tl.load(s_ptr + rows[:, None] * (K // 16) + (k0 // 16 + offs_g)[None, :], mask=ok2, other=0)
    # the reference order: block scale times global scale first, then times the element
    blk = (sc.to(tl.float8e4nv, bitcast=True).to(tl.float32) * tl.load(gs_ptr))[:, :, None]
    lo, hi = _unpack_e2m1_raw(wb.to(tl.uint32))
    lo = ((lo * _SUBNORMAL_UNFOLD) * blk).to(out_ptr.dtype.element_ty)
    hi = ((hi * _SUBNORMAL_UNFOLD) * blk).to(out_ptr.dtype.element_ty)
    if CONCAT:
        # one 32-byte store per (row, block): [lo 0..7 | hi 8..15]
        w = tl.reshape(tl.permute(tl.join(lo, hi), (0, 1, 3, 2)), (BLOCK_N, BLOCK_K))
        offs_k = k0 + tl.arange(0, BLOCK_K)
        tl.store(out_ptr + rows[:, None] * K + offs_k[None, :], w, mask=(offs_n < N)[:, None] & (offs_k < K)[None, :])
    else:
        out = out_ptr + rows[:, None, None] * K + (k0 + offs_g[:, None] * 16 + offs_j[None, :])[None, :, :]
        tl.store(out, lo, mask=ok2[:, :, None])
        tl.store(out + 8, hi, mask=ok2[:, :, None])


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def pick_config(m: int, n: int, k: int, num_sms: int, *, on_gpu: bool = True) -> GemmConfig:
    """The path and tile sizes for one GEMM shape (from the H100 sweeps in bench/kernels, see docs/kernels.md)."""
    if on_gpu and m >= DENSE_MIN_M:
        return GemmConfig("dense")
    if m <= GEMV_MAX_M:
        tiles = triton.cdiv(n, 16)
        split = 1 if tiles >= 600 else 2
        return GemmConfig("gemv", 1, 16, 512, max(1, min(split, k // 1024)), 4, 3, on_gpu)
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_n = 64 if m <= 16 else 128
    tiles = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    split = max(1, min(triton.cdiv(6 * num_sms, tiles), 8, k // 256))
    return GemmConfig("mma", block_m, block_n, 128, split, 4, 3, on_gpu)


def nvfp4_dequant(
    w: NVFP4KernelWeight,
    dtype: torch.dtype = torch.bfloat16,
    *,
    block_n: int = 32,
    block_k: int = 256,
    concat: bool = True,
) -> torch.Tensor:
    """The whole weight as `dtype` [N, K], bit-identical to `nvfp4_dequant_ref` (on the GPU)."""
    n, k = w.out_features, w.in_features
    out = torch.empty((n, k), dtype=dtype, device=w.weight.device)
    grid = (triton.cdiv(k, block_k), triton.cdiv(n, block_n))
    scales = w.weight_scale.view(torch.uint8)
    _nvfp4_dequant_kernel[grid](
        w.weight, scales, w.weight_scale_2, out, n, k, BLOCK_N=block_n, BLOCK_K=block_k, CONCAT=concat
    )
    return out


def _fused_gemm(x2: torch.Tensor, w: NVFP4KernelWeight, cfg: GemmConfig) -> torch.Tensor:
    m, k = x2.shape
    n = w.out_features
    on_gpu = x2.is_cuda
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    split = triton.cdiv(k, k_per_split)
    y = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    dest = y if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=x2.device)
    launch = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages} if on_gpu else {}
    scales = w.weight_scale.view(torch.uint8)
    use_asm = cfg.use_asm and on_gpu
    if cfg.kind == "gemv":
        grid = (triton.cdiv(n, cfg.block_n), split)
        for row in range(m):  # GEMV_MAX_M is small: one launch per row, each streaming the weight
            _nvfp4_gemv_kernel[grid](
                x2[row], w.weight, scales, w.weight_scale_2, dest[..., row, :], n, k, m * n, k_per_split,
                BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, USE_ASM=use_asm, PREFETCH=cfg.prefetch,
                X_BCAST=cfg.x_bcast, **launch,
            )  # fmt: skip
    else:
        grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m), split)
        _nvfp4_gemm_kernel[grid](
            x2, w.weight, scales, w.weight_scale_2, dest, m, n, k, x2.stride(0), n, m * n, k_per_split,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, DOT_FP32=not on_gpu, USE_ASM=use_asm,
            SWAP_AB=cfg.swap_ab,
            **launch,
        )  # fmt: skip
    if split > 1:
        block = 1024
        _splitk_reduce_kernel[(triton.cdiv(m * n, block),)](dest, y, m * n, SPLIT=split, BLOCK=block)
    return y


def nvfp4_gemm(
    x: torch.Tensor, w: NVFP4KernelWeight, bias: torch.Tensor | None = None, *, config: GemmConfig | None = None
) -> torch.Tensor:
    """`x [..., K] @ dequant(w).T (+ bias)` in x's dtype (bf16 or fp16), fp32 accumulation."""
    k, n = w.in_features, w.out_features
    if x.shape[-1] != k:
        raise ValueError(f"x: last dim {x.shape[-1]} does not match in_features {k}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    on_gpu = x2.is_cuda
    if m == 0:
        y = x2.new_empty((0, n))
    else:
        cfg = config or pick_config(m, n, k, _num_sms(x2.device.index or 0) if on_gpu else 4, on_gpu=on_gpu)
        y = x2 @ nvfp4_dequant(w, x2.dtype).T if cfg.kind == "dense" else _fused_gemm(x2, w, cfg)
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, n)

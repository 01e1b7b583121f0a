"""Weight quantization algorithms: max (ModelOpt's default), a per-block scale search, and GPTQ error feedback.

All three produce the same on-disk format (`NVFP4Weight`: E2M1 codes, FP8 block scales, the fused group's FP32
`weight_scale_2`), so any NVFP4 loader runs their output; they differ only in which codes and block scales they
pick. The global scale is never searched: it is max|W| over the fused group / 2688, as ModelOpt sets it, so fused
shards keep one shared `weight_scale_2`.

- `max`: `quantize_weight` itself: block scale = fp8(block_amax / (6 * ws2)), round to nearest. Byte-identical to
  ModelOpt's export.
- `mse`: for every 16-element block, try FP8 block scales between 0.7x and 1.6x of the max scale (1.5x is
  "four over six": the block max lands on 4 instead of 6) and keep the one with the least squared error weighted by
  the input's second moment diag(X^T X) (an activation-aware error; with no statistics, plain weight MSE).
- `gptq`: GPTQ (Frantar et al. 2022) with the NVFP4 quantizer: columns are quantized left to right and each
  column's rounding error, scaled through the Cholesky factor of the damped inverse Hessian H = X^T X, is pushed
  onto the columns not yet quantized. A block's FP8 scale is chosen when the walk reaches its first column, from the
  block's current (already error-corrected) weights, with the same scale search, weighted by the inverse-Hessian
  diagonal. No activation reordering, so every 16-column block stays one block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fp4serve.quant.nvfp4 import (
    BLOCK_SIZE,
    E2M1_MAX,
    E4M3_MAX,
    E4M3_MIN_SCALE,
    NVFP4Weight,
    cast_to_e2m1,
    e2m1_to_float,
    pack_e2m1,
    quantize_weight,
)

ALGORITHMS = ("max", "mse", "gptq")
# multipliers of the max block scale tried by the search; 1.0 first so that ties keep the max scale
SCALE_MULTIPLIERS = (1.0, *(round(0.7 + 0.05 * i, 2) for i in range(19) if round(0.7 + 0.05 * i, 2) != 1.0))


@dataclass(frozen=True)
class AlgorithmConfig:
    """Which algorithm and its knobs (damping is a fraction of the Hessian's mean diagonal)."""

    name: str = "max"
    damp: float = 0.01
    gptq_block_columns: int = 128

    def __post_init__(self) -> None:
        if self.name not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {self.name!r}: choose one of {', '.join(ALGORITHMS)}")
        if not 0 < self.damp < 1:
            raise ValueError(f"damping must be in (0, 1), got {self.damp}")
        if self.gptq_block_columns <= 0 or self.gptq_block_columns % BLOCK_SIZE:
            raise ValueError(f"GPTQ block width must be a positive multiple of {BLOCK_SIZE}")

    @property
    def needs_hessian(self) -> bool:
        return self.name != "max"


def _check_weight(w: torch.Tensor, name: str) -> None:
    if w.ndim != 2 or w.shape[1] % BLOCK_SIZE or w.numel() == 0:
        raise ValueError(
            f"{name}: cannot quantize shape {tuple(w.shape)} to NVFP4: need [N, K] with K a multiple of {BLOCK_SIZE}"
        )
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{name}: contains non-finite values (NaN or Inf); NVFP4 cannot represent them")


def max_block_scale(block_amax: torch.Tensor, ws2: torch.Tensor) -> torch.Tensor:
    """ModelOpt's block scale as float32 values of the FP8 grid: fp8(clamp(amax / (6 * ws2))), 1.0 for zero blocks."""
    ratio = block_amax / (ws2 * E2M1_MAX)
    ratio = torch.where((ratio == 0) | (block_amax == 0), torch.ones_like(ratio), ratio)
    return ratio.clamp(E4M3_MIN_SCALE, E4M3_MAX).to(torch.float8_e4m3fn).float()


def _qdq(values: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize [..., B] with per-row step [...] (= block scale * ws2), exactly as a loader decodes."""
    codes = cast_to_e2m1(values / step.unsqueeze(-1))
    return e2m1_to_float(codes) * step.unsqueeze(-1)


def search_block_scales(
    blocks: torch.Tensor, ws2: torch.Tensor, importance: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-block FP8 scales (float32 values) minimizing the importance-weighted squared error of `blocks` [..., B].

    `importance` broadcasts against `blocks` (e.g. [B] or [K/16, B]); None weighs every element equally.
    """
    block_amax = blocks.abs().amax(dim=-1)
    base = block_amax / (ws2 * E2M1_MAX)
    best_scale = max_block_scale(block_amax, ws2)
    weights = torch.ones_like(blocks) if importance is None else importance.expand_as(blocks)
    best_err = ((blocks - _qdq(blocks, best_scale * ws2)).square() * weights).sum(-1)
    for m in SCALE_MULTIPLIERS[1:]:
        scale = (base * m).clamp(E4M3_MIN_SCALE, E4M3_MAX).to(torch.float8_e4m3fn).float()
        err = ((blocks - _qdq(blocks, scale * ws2)).square() * weights).sum(-1)
        better = (err < best_err) & (block_amax > 0)
        best_scale = torch.where(better, scale, best_scale)
        best_err = torch.where(better, err, best_err)
    return best_scale


def _pack(codes: torch.Tensor, scales: torch.Tensor, ws2: torch.Tensor) -> NVFP4Weight:
    return NVFP4Weight(weight=pack_e2m1(codes), weight_scale=scales.to(torch.float8_e4m3fn), weight_scale_2=ws2)


def quantize_mse(w: torch.Tensor, ws2: torch.Tensor, importance: torch.Tensor | None = None) -> NVFP4Weight:
    """Round to nearest with searched block scales; importance [K] weighs the squared error per input column."""
    n, k = w.shape
    blocks = w.float().reshape(n, k // BLOCK_SIZE, BLOCK_SIZE)  # [N, K/16, 16]
    imp = None if importance is None else importance.float().reshape(k // BLOCK_SIZE, BLOCK_SIZE)
    scales = search_block_scales(blocks, ws2, imp)  # [N, K/16]
    codes = cast_to_e2m1(blocks / (scales * ws2).unsqueeze(-1)).reshape(n, k)
    return _pack(codes, scales, ws2)


def _inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1, in float64 for a stable factorization."""
    h = hessian.double().clone()
    diag = h.diagonal()
    dead = diag == 0
    # an input that is always zero: its weights never matter, give it unit curvature so H stays invertible
    diag[dead] = 1.0
    mean = float(diag.mean())
    for _ in range(4):
        try:
            lower = torch.linalg.cholesky(h + torch.eye(h.shape[0], dtype=h.dtype, device=h.device) * damp * mean)
            return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
        except torch.linalg.LinAlgError:
            damp *= 10
    raise ValueError("Hessian of the calibration inputs is not positive definite even with strong damping")


def quantize_gptq(
    w: torch.Tensor, hessian: torch.Tensor, ws2: torch.Tensor, *, damp: float = 0.01, block_columns: int = 128
) -> NVFP4Weight:
    """GPTQ with NVFP4 blocks (see the module docstring); hessian [K, K] = sum of x x^T over calibration tokens."""
    n, k = w.shape
    weights = w.float().clone()
    u = _inverse_hessian_factor(hessian, damp).float()  # [K, K] upper
    codes = torch.empty(n, k, dtype=torch.uint8, device=w.device)
    scales = torch.empty(n, k // BLOCK_SIZE, dtype=torch.float32, device=w.device)
    for b0 in range(0, k, block_columns):
        b1 = min(b0 + block_columns, k)
        chunk = weights[:, b0:b1].clone()
        errors = torch.empty_like(chunk)
        u_chunk = u[b0:b1, b0:b1]
        step = torch.empty(n, device=w.device)
        for j in range(b1 - b0):
            if j % BLOCK_SIZE == 0:
                # importance of each column of the block: the loss per unit error is 1 / U_jj^2
                importance = u_chunk.diagonal()[j : j + BLOCK_SIZE].reciprocal().square()
                scale = search_block_scales(chunk[:, j : j + BLOCK_SIZE], ws2, importance)
                scales[:, (b0 + j) // BLOCK_SIZE] = scale
                step = scale * ws2
            column = chunk[:, j]
            q = cast_to_e2m1(column / step)
            codes[:, b0 + j] = q
            err = (column - e2m1_to_float(q) * step) / u_chunk[j, j]
            chunk[:, j + 1 :] -= err.unsqueeze(1) * u_chunk[j, j + 1 :].unsqueeze(0)
            errors[:, j] = err
        weights[:, b1:] -= errors @ u[b0:b1, b1:]
    return _pack(codes, scales, ws2)


def quantize(
    w: torch.Tensor,
    ws2: torch.Tensor,
    config: AlgorithmConfig,
    hessian: torch.Tensor | None = None,
    *,
    name: str = "weight",
) -> NVFP4Weight:
    """Quantize one weight [N, K] with the fused group's global scale `ws2` by `config`'s algorithm.

    `hessian` (sum of x x^T over the calibration inputs, [K, K]) is used by `mse` (its diagonal) and `gptq`;
    without it both fall back to plain weight-space error.
    """
    _check_weight(w, name)
    ws2 = ws2.detach().float().reshape(()).to(w.device)
    if config.name == "max" or float(ws2) == 0:
        return quantize_weight(w, name=name, weight_scale_2=ws2)
    hessian = None if hessian is None else hessian.to(w.device)
    if config.name == "mse" or hessian is None:
        return quantize_mse(w, ws2, None if hessian is None else hessian.diagonal())
    return quantize_gptq(w, hessian, ws2, damp=config.damp, block_columns=config.gptq_block_columns)

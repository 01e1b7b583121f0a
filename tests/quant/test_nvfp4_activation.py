"""W4A4 activation quantize-dequantize: against a plain per-element loop, plus the saturation and flush properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fp4serve.quant.nvfp4 import BLOCK_SIZE, input_scale_from_amax, quant_dequant_activation

GRID = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def nearest_e2m1(y: np.float32) -> float:
    """Nearest grid value by exhaustive search; an exact tie goes to the grid point with an even index."""
    mag = abs(float(y))
    best = min(range(len(GRID)), key=lambda i: (abs(mag - GRID[i]), i % 2))
    return float(np.copysign(GRID[best], float(y)))


def fp8_round(v: np.float32) -> np.float32:
    return np.float32(torch.tensor(float(v), dtype=torch.float32).to(torch.float8_e4m3fn).float().item())


def loop_quant_dequant(x: torch.Tensor, input_scale: float) -> torch.Tensor:
    """nvfp4_format.md section 8 / vLLM ref_nvfp4_quant_dequant, one block and one element at a time in fp32."""
    f32 = np.float32
    rows = x.reshape(-1, x.shape[-1]).float().numpy()
    out = np.zeros_like(rows)
    gs = f32(1) / f32(input_scale)
    inv_gs = f32(1) / gs
    for r in range(rows.shape[0]):
        for start in range(0, rows.shape[1], BLOCK_SIZE):
            block = rows[r, start : start + BLOCK_SIZE]
            amax = f32(np.abs(block).max())
            s = fp8_round(f32(min(f32(gs * f32(amax * f32(1 / 6))), f32(448))))
            step = f32(s * inv_gs)
            o = f32(0) if step == 0 else f32(f32(1) / step)
            for j, v in enumerate(block):
                y = f32(min(max(f32(v * o), f32(-6)), f32(6)))
                out[r, start + j] = f32(f32(nearest_e2m1(y)) * f32(s / gs))
    return torch.from_numpy(out).reshape(x.shape).to(x.dtype)


def spread_activations(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Blocks over nine orders of magnitude, a zero block, and values that exceed the calibrated amax."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    blocks = x.reshape(-1, BLOCK_SIZE)
    blocks *= torch.pow(10.0, torch.empty(blocks.shape[0], 1).uniform_(-8, 1, generator=g))
    blocks[0] = 0
    blocks[1] *= 1e3
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_matches_the_loop_reference_bit_for_bit(dtype: torch.dtype) -> None:
    for seed, shape in enumerate([(3, 64), (2, 2, 48), (1, 32)]):
        x = spread_activations(shape, dtype, seed)
        input_scale = input_scale_from_amax(torch.tensor(1.5))
        got = quant_dequant_activation(x, input_scale)
        expected = loop_quant_dequant(x, float(input_scale))
        assert got.dtype == dtype and got.shape == x.shape
        assert torch.equal(got, expected)


def test_blocks_above_the_calibrated_amax_saturate() -> None:
    amax = 2.0
    input_scale = input_scale_from_amax(torch.tensor(amax))
    x = torch.linspace(-50, 50, 64).reshape(2, 32)
    out = quant_dequant_activation(x, input_scale)
    # block scale saturates at 448 and elements at +-6: the result is clipped to (about) the calibrated amax
    assert float(out.abs().max()) == pytest.approx(amax, rel=1e-6)
    assert float(out[0, 0]) < 0 < float(out[1, -1])


def test_tiny_blocks_flush_to_zero_and_zero_blocks_stay_zero() -> None:
    amax = 4.0
    input_scale = input_scale_from_amax(torch.tensor(amax))
    # a block scale below half the smallest fp8 subnormal (2^-10) rounds to 0: amax_blk < amax * 2^-10 / 448
    threshold = amax * 2.0**-10 / 448
    x = torch.zeros(4, BLOCK_SIZE)
    x[0] = torch.linspace(-1, 1, BLOCK_SIZE) * threshold * 0.9
    x[1] = torch.linspace(-1, 1, BLOCK_SIZE) * threshold * 4
    x[2] = torch.linspace(-1, 1, BLOCK_SIZE) * amax
    out = quant_dequant_activation(x, input_scale)
    assert bool((out[0] == 0).all())
    assert bool((out[1] != 0).any())
    assert bool((out[3] == 0).all())
    assert float(out[2].abs().max()) == pytest.approx(amax, rel=1e-6)


def test_rejects_a_width_that_is_not_a_multiple_of_16() -> None:
    with pytest.raises(ValueError, match="multiple of the NVFP4 block size 16"):
        quant_dequant_activation(torch.randn(2, 24), torch.tensor(0.01))

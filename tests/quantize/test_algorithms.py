"""Weight quantization algorithms: `max` is ModelOpt's bytes, the better ones keep the format and lower the error
they are built to lower (output error X (W - W_q)^T on correlated inputs), and bad weights are rejected."""

from __future__ import annotations

import pytest
import torch

from fp4serve.quant.algorithms import AlgorithmConfig, quantize, search_block_scales
from fp4serve.quant.nvfp4 import (
    cast_to_e2m1,
    dequantize_weight,
    e2m1_to_float,
    global_scale_from_amax,
    quantize_weight,
)


def problem(n: int = 64, k: int = 128, tokens: int = 2048, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A heavy-tailed weight and correlated, unevenly scaled inputs (like real activations)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) + 0.05 * torch.randn(n, k, generator=g) ** 3
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    x = (torch.randn(tokens, k, generator=g) @ mix) * (0.2 + 3 * torch.rand(k, generator=g))
    return w.to(torch.bfloat16), x


def output_error(w: torch.Tensor, x: torch.Tensor, q) -> float:
    wq = dequantize_weight(q.weight, q.weight_scale, q.weight_scale_2)
    ref = x @ w.float().T
    return float((x @ wq.T - ref).norm() / ref.norm())


def test_max_is_modelopt_bytes_with_the_group_scale() -> None:
    w, _ = problem()
    ws2 = global_scale_from_amax(torch.tensor(3.0))  # a fused group's larger amax
    ours = quantize(w, ws2, AlgorithmConfig("max"))
    ref = quantize_weight(w, weight_scale_2=ws2)
    assert torch.equal(ours.weight, ref.weight)
    assert torch.equal(ours.weight_scale.view(torch.uint8), ref.weight_scale.view(torch.uint8))
    assert torch.equal(ours.weight_scale_2, ref.weight_scale_2)


def test_scale_search_never_loses_to_the_max_scale() -> None:
    w, _ = problem(seed=1)
    ws2 = global_scale_from_amax(w.float().abs().amax())
    blocks = w.float().reshape(64, 8, 16)
    importance = torch.rand(8, 16, generator=torch.Generator().manual_seed(2))
    chosen = search_block_scales(blocks, ws2, importance)
    base = quantize_weight(w, weight_scale_2=ws2).weight_scale.float()

    def err(scale: torch.Tensor) -> torch.Tensor:
        # the exporter's rounding: codes of w / (scale * ws2), decoded as code * (scale * ws2)
        step = (scale * ws2).unsqueeze(-1)
        deq = e2m1_to_float(cast_to_e2m1(blocks / step)) * step
        return ((blocks - deq).square() * importance).sum(-1)

    assert bool((err(chosen) <= err(base)).all())
    assert bool((err(chosen) < err(base)).any())
    # chosen scales are FP8 values
    assert torch.equal(chosen.to(torch.float8_e4m3fn).float(), chosen)


@pytest.mark.parametrize("name", ["mse", "gptq"])
def test_better_algorithms_lower_the_output_error(name: str) -> None:
    w, x = problem()
    hessian = x.T @ x
    ws2 = global_scale_from_amax(w.float().abs().amax())
    base = output_error(w, x, quantize(w, ws2, AlgorithmConfig("max")))
    q = quantize(w, ws2, AlgorithmConfig(name), hessian)
    assert q.weight.dtype == torch.uint8 and q.weight.shape == (64, 64)
    assert q.weight_scale.dtype == torch.float8_e4m3fn and q.weight_scale.shape == (64, 8)
    assert torch.equal(q.weight_scale_2, ws2)
    ratio = output_error(w, x, q) / base
    assert ratio < (0.95 if name == "mse" else 0.75), ratio


def test_gptq_survives_dead_inputs_and_zero_rows() -> None:
    w, x = problem(seed=3)
    x[:, :16] = 0  # inputs that never fire: their Hessian rows are zero
    w = w.clone()
    w[5] = 0
    ws2 = global_scale_from_amax(w.float().abs().amax())
    q = quantize(w, ws2, AlgorithmConfig("gptq"), x.T @ x)
    deq = dequantize_weight(q.weight, q.weight_scale, q.weight_scale_2)
    assert bool(torch.isfinite(deq).all()) and bool((deq[5] == 0).all())
    assert output_error(w, x, q) < output_error(w, x, quantize(w, ws2, AlgorithmConfig("max")))


def test_all_zero_weight_and_bad_weights() -> None:
    zero = torch.zeros(16, 32)
    q = quantize(zero, torch.tensor(0.0), AlgorithmConfig("gptq"), torch.eye(32))
    assert float(q.weight_scale_2) == 0
    assert bool((dequantize_weight(q.weight, q.weight_scale, q.weight_scale_2) == 0).all())
    with pytest.raises(ValueError, match="multiple of 16"):
        quantize(torch.ones(4, 24), torch.tensor(1.0), AlgorithmConfig("mse"))
    bad = torch.ones(4, 32)
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        quantize(bad, torch.tensor(1.0), AlgorithmConfig("gptq"), torch.eye(32))
    with pytest.raises(ValueError, match="unknown algorithm"):
        AlgorithmConfig("awq")

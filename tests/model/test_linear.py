"""NVFP4Linear: both modes, the dequantized-weight cache and its invalidation, loading checks, state dict names."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fp4serve.model.linear import NVFP4Linear
from fp4serve.quant.nvfp4 import dequantize_weight, input_scale_from_amax, quant_dequant_activation, quantize_weight


def make_layer(mode: str = "w4a16", cache: bool | None = None, bias: bool = False, seed: int = 0) -> NVFP4Linear:
    g = torch.Generator().manual_seed(seed)
    q = quantize_weight(torch.randn(48, 64, generator=g) * 0.05)
    b = torch.randn(48, generator=g).bfloat16() if bias else None
    return NVFP4Linear.from_quantized(
        q, input_scale=input_scale_from_amax(torch.tensor(3.0)), bias=b, mode=mode, cache_dequantized=cache
    )


@pytest.mark.parametrize("cache", [None, True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_w4a16_is_a_matmul_with_the_dequantized_weight(cache: bool | None, bias: bool) -> None:
    layer = make_layer("w4a16", cache, bias)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    w = dequantize_weight(layer.weight, layer.weight_scale, layer.weight_scale_2, torch.bfloat16)
    expected = F.linear(x, w, layer.bias)
    assert torch.equal(layer(x), expected)
    assert torch.equal(layer.dequantized_weight(), w)
    # the cache is on by default on the CPU, off when disabled
    assert (layer._cache is not None) == (cache is not False)


@pytest.mark.parametrize("cache", [True, False])
def test_w4a4_quantizes_activations_first(cache: bool) -> None:
    layer = make_layer("w4a4", cache)
    x = torch.randn(3, 2, 64, dtype=torch.bfloat16) * 2
    x_dq = quant_dequant_activation(x, layer.input_scale)
    expected = F.linear(x_dq, layer.dequantized_weight(torch.bfloat16))
    out = layer(x)
    assert torch.equal(out, expected)
    assert not torch.equal(out, make_layer("w4a16", cache)(x))


def test_cache_follows_weight_updates() -> None:
    layer = make_layer(cache=True)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    first = layer(x)
    other = make_layer(seed=1)
    # load_state_dict writes the buffers in place; the cached weight must not survive it
    layer.load_state_dict(other.state_dict())
    assert torch.equal(layer(x), other(x))
    assert not torch.equal(layer(x), first)
    # a different activation dtype builds a new cached weight
    assert layer(x.float()).dtype == torch.float32


def test_state_dict_uses_checkpoint_names_and_no_cache() -> None:
    layer = make_layer(cache=True, bias=True)
    layer(torch.randn(1, 64, dtype=torch.bfloat16))
    sd = layer.state_dict()
    assert list(sd) == ["weight", "weight_scale", "weight_scale_2", "input_scale", "bias"]
    assert (sd["weight"].dtype, tuple(sd["weight"].shape)) == (torch.uint8, (48, 32))
    assert (sd["weight_scale"].dtype, tuple(sd["weight_scale"].shape)) == (torch.float8_e4m3fn, (48, 4))
    assert (sd["weight_scale_2"].dtype, tuple(sd["weight_scale_2"].shape)) == (torch.float32, ())


def test_builds_on_meta_and_materializes() -> None:
    with torch.device("meta"):
        layer = NVFP4Linear(64, 32)
    layer.to_empty(device="cpu")
    assert layer.weight.device.type == "cpu" and tuple(layer.weight.shape) == (32, 32)


def test_bad_construction_and_loading_raise_value_errors() -> None:
    with pytest.raises(ValueError, match="multiple of 16"):
        NVFP4Linear(40, 8)
    with pytest.raises(ValueError, match="mode"):
        NVFP4Linear(32, 8, mode="w8a8")
    q = quantize_weight(torch.randn(8, 32))
    layer = NVFP4Linear(32, 8, mode="w4a4")
    with pytest.raises(ValueError, match="needs an input_scale"):
        layer.load_quantized(q.weight, q.weight_scale, q.weight_scale_2)
    with pytest.raises(ValueError, match="weight_scale: expected torch.float8_e4m3fn"):
        layer.load_quantized(q.weight, q.weight_scale.float(), q.weight_scale_2, input_scale=torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"weight: expected torch.uint8 of shape \[8, 16\]"):
        layer.load_quantized(q.weight[:, :8], q.weight_scale, q.weight_scale_2, input_scale=torch.tensor(1.0))

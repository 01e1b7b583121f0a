"""NVFP4 W4A16 GEMM kernels vs the float64 reference dequant (nvfp4_format.md §8), on awkward shapes."""

from __future__ import annotations

import pytest
import torch

from fp4serve.ops.triton.nvfp4_gemm import (
    GemmConfig,
    nvfp4_dequant,
    nvfp4_dequant_ref,
    nvfp4_gemm,
    nvfp4_gemm_ref,
    prepare_nvfp4_weight,
)


def random_nvfp4(n: int, k: int, device: str, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
    # scales over the whole e4m3 range, subnormals (2**-9) included
    scale = (2.0 ** (torch.rand(n, k // 16, generator=g) * 17 - 9)).to(torch.float8_e4m3fn)
    return weight.to(device), scale.to(device), torch.tensor(0.0123, device=device)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


@pytest.mark.parametrize("concat", [True, False])
def test_dequant_is_bit_exact(concat: bool, device: str) -> None:
    w, s, gs = random_nvfp4(37, 80, device, 0)
    kw = prepare_nvfp4_weight(w, s, gs)
    assert torch.equal(nvfp4_dequant(kw, torch.float32, concat=concat), nvfp4_dequant_ref(w, s, gs, torch.float32))
    out, ref = nvfp4_dequant(kw, torch.bfloat16, concat=concat), nvfp4_dequant_ref(w, s, gs, torch.bfloat16)
    if device == "cuda":
        assert torch.equal(out, ref)
    else:
        # the interpreter truncates fp32 -> bf16 instead of rounding to nearest even: one ulp
        torch.testing.assert_close(out, ref, rtol=2**-7, atol=0)


def test_dequant_ref_matches_code_table() -> None:
    # codes 0..15 in one row: low nibble = even k
    w = torch.tensor([[0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE]], dtype=torch.uint8)
    s = torch.full((1, 1), 2.0).to(torch.float8_e4m3fn)
    out = nvfp4_dequant_ref(w, s, torch.tensor(0.5))
    lut = [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6]
    assert out[0].tolist() == lut


@pytest.mark.parametrize(
    ("m", "n", "k", "cfg"),
    [
        (1, 37, 80, None),
        (1, 40, 96, GemmConfig("gemv", block_n=16, block_k=32, split_k=2)),
        (2, 40, 96, GemmConfig("gemv", block_n=16, block_k=32, split_k=1, prefetch=True)),
        (1, 40, 96, GemmConfig("gemv", block_n=16, block_k=32, split_k=2, x_bcast=True)),
        (3, 37, 80, None),
        (17, 40, 96, GemmConfig("mma", block_m=16, block_n=32, block_k=32, split_k=2)),
        (3, 24, 48, GemmConfig("mma", block_m=16, block_n=16, block_k=32, split_k=1, swap_ab=False)),
    ],
)
def test_fused_gemm_matches_reference(m: int, n: int, k: int, cfg: GemmConfig | None, device: str) -> None:
    w, s, gs = random_nvfp4(n, k, device, m * 1000 + n)
    kw = prepare_nvfp4_weight(w, s, gs)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(device)
    ref = x.double() @ nvfp4_dequant_ref(w, s, gs, torch.float64).T
    # fp32 activations: the kernels' products are exact, only the fp32 summation order differs
    assert rel_err(nvfp4_gemm(x, kw, config=cfg), ref) < 1e-5
    out = nvfp4_gemm(x.bfloat16(), kw, config=cfg)
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    assert rel_err(out, x.bfloat16().double() @ nvfp4_dequant_ref(w, s, gs, torch.float64).T) < 1e-2


def test_leading_dims_bias_and_empty(device: str) -> None:
    w, s, gs = random_nvfp4(24, 32, device, 7)
    kw = prepare_nvfp4_weight(w, s, gs)
    x = torch.randn(2, 3, 32).to(device)
    bias = torch.randn(24).to(device)
    out = nvfp4_gemm(x, kw, bias)
    assert out.shape == (2, 3, 24)
    assert rel_err(out, nvfp4_gemm_ref(x.double(), w, s, gs.double(), bias.double())) < 1e-5
    assert nvfp4_gemm(x[:0], kw).shape == (0, 3, 24)


def test_prepare_rejects_bad_input() -> None:
    w = torch.zeros(4, 8, dtype=torch.uint8)
    s = torch.ones(4, 1).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="weight_scale"):
        prepare_nvfp4_weight(w, s.float(), torch.tensor(1.0))
    with pytest.raises(ValueError, match="multiple of 16"):
        prepare_nvfp4_weight(torch.zeros(4, 4, dtype=torch.uint8), s, torch.tensor(1.0))
    with pytest.raises(ValueError, match="in_features"):
        nvfp4_gemm(torch.zeros(1, 8), prepare_nvfp4_weight(w, s, torch.tensor(1.0)))


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 3, 17, 32, 64, 200])
@pytest.mark.parametrize(("n", "k"), [(17408, 5120), (5120, 17408), (1000, 784)])
def test_gpu_gemm_27b_shapes(m: int, n: int, k: int) -> None:
    w, s, gs = random_nvfp4(n, k, "cuda", n + k)
    kw = prepare_nvfp4_weight(w, s, gs)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ref = x.double() @ nvfp4_dequant_ref(w, s, gs, torch.float64).T
    out = nvfp4_gemm(x, kw)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 5e-3


@pytest.mark.gpu
def test_gpu_asm_unpack_matches_arithmetic_unpack() -> None:
    w, s, gs = random_nvfp4(300, 1040, "cuda", 3)
    kw = prepare_nvfp4_weight(w, s, gs)
    for m, kind in ((1, "gemv"), (5, "mma")):
        x = torch.randn(m, 1040, device="cuda", dtype=torch.bfloat16)
        a = nvfp4_gemm(x, kw, config=GemmConfig(kind, split_k=2, use_asm=True))
        b = nvfp4_gemm(x, kw, config=GemmConfig(kind, split_k=2, use_asm=False))
        assert torch.equal(a, b)
        for variant in ({"prefetch": True}, {"x_bcast": True}):
            c = nvfp4_gemm(x, kw, config=GemmConfig(kind, split_k=2, **variant))
            torch.testing.assert_close(a, c, rtol=0, atol=0)

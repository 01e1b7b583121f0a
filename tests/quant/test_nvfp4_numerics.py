"""NVFP4 weight numerics checked bit for bit against nvidia-modelopt 0.47's NVFP4QTensor (the golden reference)."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fp4serve.quant.nvfp4 import (
    BLOCK_SIZE,
    E2M1_VALUES,
    cast_to_e2m1,
    dequantize_weight,
    e2m1_to_float,
    global_scale_from_amax,
    input_scale_from_amax,
    pack_e2m1,
    quantize_weight,
    unpack_e2m1,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
SHAPES = [(1, 16), (3, 48), (17, 64), (64, 256), (2, 3, 32)]
KINDS = ["normal", "uniform", "outliers", "tiny", "zero_blocks", "neg_zero", "constant", "heavy_tail", "wide_range"]


def make_weight(kind: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 0.02
    if kind == "uniform":
        x = torch.rand(shape, generator=g) * 2 - 1
    elif kind == "outliers":
        mask = torch.rand(shape, generator=g) < 0.01
        mask.view(-1)[0] = True
        x = torch.where(mask, x * 2000, x)
    elif kind == "tiny":
        # subnormal in fp16, far below the block scale range for the rest
        x = x * 1e-4
    elif kind == "zero_blocks":
        blocks = x.reshape(-1, BLOCK_SIZE)
        blocks[torch.rand(blocks.shape[0], generator=g) < 0.3] = 0
        blocks[0] = 0
        # an all-zero tensor is the one documented divergence from ModelOpt (tested separately)
        blocks[-1, 0] = 0.01
    elif kind == "neg_zero":
        x = torch.where(torch.rand(shape, generator=g) < 0.2, torch.tensor(-0.0), x)
        # tiny negatives round to code 8 (-0) next to a large value in the same block
        x.reshape(-1, BLOCK_SIZE)[:, 1] = -1e-7
        x.reshape(-1, BLOCK_SIZE)[:, 0] = 0.5
    elif kind == "constant":
        x = torch.full(shape, -0.3)
    elif kind == "heavy_tail":
        x = torch.randn(shape, generator=g) / (torch.rand(shape, generator=g) + 1e-3)
    elif kind == "wide_range":
        # fp32 only: block amax / global amax underflows fp32 in some blocks (ModelOpt then uses scale 1.0)
        exps = torch.randint(-40, 30, shape, generator=g).float()
        x = torch.randn(shape, generator=g) * torch.pow(10.0, exps)
    return x.to(dtype)


def boundary_weight(dtype: torch.dtype, ws2: float = 2.0**-8) -> torch.Tensor:
    """Rows whose scaled values land exactly on every E2M1 rounding boundary, and one ulp either side of it."""
    grid = torch.tensor([6.0, 5.0, 4.0, 3.5, 3.0, 2.5, 2.0, 1.75, 1.5, 1.25, 1.0, 0.75, 0.5, 0.25, 0.125, 0.0])
    rows = []
    for s in (1.0, 2.0**-3, 4.0, 64.0, 2.0**-9):
        block = (grid * s * ws2).to(dtype)
        up = torch.nextafter(block, torch.tensor(float("inf"), dtype=dtype))
        down = torch.nextafter(block, torch.tensor(0.0, dtype=dtype))
        # keep each block's max at exactly 6 * s * ws2 so its fp8 scale is exactly s
        up[0], down[0] = block[0], block[0]
        for b in (block, up, down):
            rows += [b, -b]
    return torch.stack(rows).reshape(len(rows) // 2, 2 * BLOCK_SIZE)


def modelopt_quantize(w: torch.Tensor, ws2: torch.Tensor | None = None):
    return NVFP4QTensor.quantize(w.clone(), BLOCK_SIZE, weights_scaling_factor_2=ws2)


def modelopt_dequantize(qt, scale: torch.Tensor, scale_2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return qt.dequantize(dtype=dtype, scale=scale, double_scale=scale_2, block_sizes={-1: BLOCK_SIZE})


def assert_matches_modelopt(w: torch.Tensor, ws2: torch.Tensor | None = None) -> None:
    ours = quantize_weight(w, weight_scale_2=ws2)
    qt, scale, scale_2 = modelopt_quantize(w, ws2)
    assert torch.equal(ours.weight, qt._quantized_data)
    assert ours.weight_scale.dtype == torch.float8_e4m3fn
    assert torch.equal(ours.weight_scale.view(torch.uint8), scale.view(torch.uint8))
    assert ours.weight_scale_2.dtype == torch.float32 and ours.weight_scale_2.shape == ()
    assert torch.equal(ours.weight_scale_2, scale_2.float().reshape(()))
    for dtype in {torch.float32, torch.bfloat16, w.dtype}:
        expected = modelopt_dequantize(qt, scale, scale_2, dtype)
        got = dequantize_weight(ours.weight, ours.weight_scale, ours.weight_scale_2, dtype)
        assert got.dtype == dtype
        # compare bit patterns so -0.0 vs 0.0 would count as a difference
        assert torch.equal(
            got.view(torch.int16 if dtype != torch.float32 else torch.int32),
            expected.view(torch.int16 if dtype != torch.float32 else torch.int32),
        )


def test_e2m1_cast_follows_the_rounding_table() -> None:
    values = [0.0, 0.25, 0.2501, 0.5, 0.7499, 0.75, 1.25, 1.2501, 1.7499, 1.75, 2.5, 2.5001, 3.4999, 3.5, 5.0]
    values += [5.0001, 6.0, 7.5, 1e30, float("inf")]
    codes = [0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 7, 7, 7]
    x = torch.tensor(values)
    assert cast_to_e2m1(x).tolist() == codes
    # -0.0 keeps code 0 (ModelOpt sets the sign from x < 0); every other negative gets the sign bit
    assert cast_to_e2m1(-x).tolist() == [0] + [c | 8 for c in codes[1:]]
    # a tiny negative becomes -0 (code 8)
    assert cast_to_e2m1(torch.tensor([-0.0, -1e-9])).tolist() == [0, 8]


def test_e2m1_cast_matches_modelopt_on_a_dense_sweep() -> None:
    bounds = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0])
    near = torch.cat([bounds, torch.nextafter(bounds, bounds + 1), torch.nextafter(bounds, bounds - 1)])
    x = torch.cat([torch.linspace(-8, 8, 40001), near, -near, torch.tensor([0.0, -0.0, 1e-30, -1e-30])])
    assert torch.equal(cast_to_e2m1(x), NVFP4QTensor._cast_fp4(x.clone()))


def test_decode_table_and_nibble_order() -> None:
    codes = torch.arange(16, dtype=torch.uint8)
    assert e2m1_to_float(codes).tolist() == list(E2M1_VALUES)
    # code 8 ("-0") decodes to +0.0, as in ModelOpt
    assert not torch.signbit(e2m1_to_float(torch.tensor([8], dtype=torch.uint8))).item()
    packed = pack_e2m1(torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8))
    assert packed.tolist() == [[0x21, 0x0F]]
    assert torch.equal(unpack_e2m1(packed), torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8))
    rand = torch.randint(0, 16, (5, 3, 64), dtype=torch.uint8)
    assert torch.equal(unpack_e2m1(pack_e2m1(rand)), rand)
    with pytest.raises(ValueError, match="must be even"):
        pack_e2m1(torch.zeros(3, dtype=torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_quantize_and_dequantize_match_modelopt(kind: str, dtype: torch.dtype) -> None:
    if kind == "wide_range" and dtype != torch.float32:
        pytest.skip("the range only exists in fp32")
    for seed, shape in enumerate(SHAPES):
        assert_matches_modelopt(make_weight(kind, shape, dtype, seed))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_values_on_rounding_boundaries_match_modelopt(dtype: torch.dtype) -> None:
    w = boundary_weight(dtype)
    # with the power-of-two global scale the elements scale to exactly the boundaries (and one ulp off them)
    ws2 = torch.tensor(2.0**-8)
    q = quantize_weight(w, weight_scale_2=ws2)
    assert set(q.weight_scale.float().unique().tolist()) == {1.0, 2.0**-3, 4.0, 64.0, 2.0**-9}
    assert_matches_modelopt(w, ws2)
    # and with the global scale from the tensor's own amax, which is not a power of two
    assert_matches_modelopt(w)


def test_fused_group_shares_the_global_scale_like_modelopt() -> None:
    g = torch.Generator().manual_seed(7)
    members = [torch.randn(n, 64, generator=g).mul(s).bfloat16() for n, s in ((32, 0.02), (16, 0.05), (16, 0.01))]
    shared = global_scale_from_amax(torch.stack([m.abs().amax().float() for m in members]).amax())
    for m in members:
        ours = quantize_weight(m, weight_scale_2=shared)
        assert torch.equal(ours.weight_scale_2, shared)
        assert_matches_modelopt(m, shared)
    # a shared scale below the member's own amax saturates blocks at 448 and elements at +-6, as ModelOpt does
    small = global_scale_from_amax(members[1].abs().amax()) / 4
    assert float(quantize_weight(members[1], weight_scale_2=small).weight_scale.float().max()) == 448.0
    assert_matches_modelopt(members[1], small)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 3),
    blocks=st.integers(1, 3),
    data=st.data(),
    dtype=st.sampled_from(DTYPES),
)
def test_random_values_match_modelopt(rows: int, blocks: int, data: st.DataObject, dtype: torch.dtype) -> None:
    width = {torch.float32: 32, torch.float16: 16, torch.bfloat16: 32}[dtype]
    values = data.draw(
        st.lists(
            st.floats(allow_nan=False, allow_infinity=False, width=width, min_value=-6e4, max_value=6e4),
            min_size=rows * blocks * BLOCK_SIZE,
            max_size=rows * blocks * BLOCK_SIZE,
        )
    )
    w = torch.tensor(values, dtype=torch.float32).to(dtype).reshape(rows, blocks * BLOCK_SIZE)
    if not bool(w.ne(0).any()):
        w[0, 0] = 1.0
    assert_matches_modelopt(w)


def test_round_trip_error_is_within_half_a_step() -> None:
    w = make_weight("heavy_tail", (64, 256), torch.float32, 3)
    q = quantize_weight(w)
    deq = dequantize_weight(q.weight, q.weight_scale, q.weight_scale_2)
    step = (q.weight_scale.float() * q.weight_scale_2).repeat_interleave(BLOCK_SIZE, dim=-1)
    # the widest E2M1 gap is 4 -> 6, so the error is at most one step; fp8 rounding of the scale can push a
    # block's max up to 1/16 beyond 6 steps, which saturates by less than that
    assert bool(((w - deq).abs() <= step * (1.0 + 1e-6)).all())
    assert float((w - deq).abs().max()) > 0


def test_all_zero_tensor_dequantizes_to_zero() -> None:
    q = quantize_weight(torch.zeros(4, 32, dtype=torch.bfloat16))
    assert float(q.weight_scale_2) == 0.0
    assert bool((q.weight == 0).all()) and bool((q.weight_scale.float() == 1.0).all())
    assert bool((dequantize_weight(q.weight, q.weight_scale, q.weight_scale_2) == 0).all())


@pytest.mark.parametrize(
    ("tensor", "problem"),
    [
        (torch.randn(4, 40), "not a multiple of the NVFP4 block size 16"),
        (torch.randn(0, 32), "empty"),
        (torch.tensor(1.0), "empty"),
        (torch.tensor([[float("nan")] + [0.0] * 15]), "non-finite"),
        (torch.tensor([[float("-inf")] + [0.0] * 15]), "non-finite"),
        (torch.ones(2, 16, dtype=torch.int32), "floating point"),
    ],
)
def test_unquantizable_input_names_tensor_and_problem(tensor: torch.Tensor, problem: str) -> None:
    with pytest.raises(ValueError, match=problem) as info:
        quantize_weight(tensor, name="model.layers.3.mlp.down_proj.weight")
    assert "model.layers.3.mlp.down_proj.weight" in str(info.value)


def test_bad_shared_scale_and_bad_amax_are_rejected() -> None:
    w = torch.randn(2, 16)
    for bad in (torch.tensor(-1.0), torch.tensor(float("nan")), torch.tensor(0.0), torch.ones(2)):
        with pytest.raises(ValueError, match="weight_scale_2"):
            quantize_weight(w, name="w", weight_scale_2=bad)
    with pytest.raises(ValueError, match="finite and positive"):
        input_scale_from_amax(torch.tensor(0.0))
    assert float(input_scale_from_amax(torch.tensor(2688.0))) == 1.0


def test_dequantize_rejects_inconsistent_tensors() -> None:
    q = quantize_weight(torch.randn(4, 32))
    with pytest.raises(ValueError, match="uint8"):
        dequantize_weight(q.weight.float(), q.weight_scale, q.weight_scale_2)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        dequantize_weight(q.weight, q.weight_scale.float(), q.weight_scale_2)
    with pytest.raises(ValueError, match="do not match"):
        dequantize_weight(q.weight, q.weight_scale[:, :1], q.weight_scale_2)

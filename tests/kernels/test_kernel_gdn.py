"""Gated DeltaNet recurrence: our Triton kernel and the fla-core chunked wrapper vs the float64 per-token loop."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from fp4serve.ops.triton.gdn import gdn_chunk_prefill, gdn_recurrent, gdn_recurrent_ref


def _case(h: int, hv: int, dk: int, dv: int, lens: list[int], slots: int, device: str, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    t = sum(lens)
    # q, k, v as row-strided views of one conv output, the way the model slices it
    conv = torch.randn(t, 2 * h * dk + hv * dv, generator=g).to(device=device, dtype=dtype)
    q = conv[:, : h * dk].view(t, h, dk)
    k = conv[:, h * dk : 2 * h * dk].view(t, h, dk)
    v = conv[:, 2 * h * dk :].view(t, hv, dv)
    a, b = (torch.randn(t, hv, generator=g).to(device=device, dtype=dtype) for _ in range(2))
    a_log = (torch.rand(hv, generator=g) * 2 - 1).to(device)
    dt_bias = torch.randn(hv, generator=g).to(device)
    state = (torch.randn(slots, hv, dk, dv, generator=g) * 0.1).to(device)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    idx = torch.randperm(slots, generator=g)[: len(lens)].to(device)
    return q, k, v, a, b, a_log, dt_bias, state, idx, cu


def test_recurrent_varlen(device: str) -> None:
    q, k, v, a, b, a_log, dt_bias, state, idx, cu = _case(2, 6, 16, 32, [1, 3, 2], 5, device, torch.float32, 0)
    init = torch.tensor([True, False, True], device=device)
    ref_state = state.clone()
    ref = gdn_recurrent_ref(q, k, v, a, b, a_log, dt_bias, ref_state, idx, cu, init)
    out = gdn_recurrent(q, k, v, a, b, a_log, dt_bias, state, idx, cu, init)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state, ref_state, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_gpu_recurrent_decode_27b_heads() -> None:
    q, k, v, a, b, a_log, dt_bias, state, idx, cu = _case(16, 48, 128, 128, [1] * 5, 9, "cuda", torch.bfloat16, 1)
    init = torch.ones(5, dtype=torch.bool, device="cuda")
    ref_state = state.clone()
    ref = gdn_recurrent_ref(q, k, v, a, b, a_log, dt_bias, ref_state, idx, cu, init)
    out = gdn_recurrent(q, k, v, a, b, a_log, dt_bias, state, idx, cu, init)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(state, ref_state, rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("fla") is None, reason="needs fla-core")
def test_gpu_fla_chunk_prefill_varlen() -> None:
    lens = [1, 200, 64, 7]
    q, k, v, a, b, a_log, dt_bias, state, idx, cu = _case(16, 48, 128, 128, lens, 6, "cuda", torch.bfloat16, 2)
    init = torch.tensor([True, False, True, True], device="cuda")
    ref_state = state.clone()
    ref = gdn_recurrent_ref(q, k, v, a, b, a_log, dt_bias, ref_state, idx, cu, init)
    st_fla = state.clone()
    out = gdn_chunk_prefill(q, k, v, a, b, a_log, dt_bias, st_fla, idx, cu, init)
    torch.testing.assert_close(out.float(), ref.float(), rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(st_fla, ref_state, rtol=2e-2, atol=5e-3)
    out_rec = gdn_recurrent(q, k, v, a, b, a_log, dt_bias, state, idx, cu, init)
    torch.testing.assert_close(out_rec.float(), ref.float(), rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(state, ref_state, rtol=1e-3, atol=1e-4)

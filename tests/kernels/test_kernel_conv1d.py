"""Causal depthwise conv1d + SiLU (decode update and varlen prefill) vs the PyTorch reference, state included."""

from __future__ import annotations

import pytest
import torch

from fp4serve.ops.triton.conv1d import causal_conv1d_update, causal_conv1d_varlen, causal_conv1d_varlen_ref


def _case(c: int, lens: list[int], slots: int, device: str, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(lens), c, generator=g).to(device=device, dtype=dtype)
    w = torch.randn(c, 1, 4, generator=g).to(device=device, dtype=dtype)
    state = torch.randn(slots, c, 3, generator=g).to(device=device, dtype=dtype)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    idx = torch.randperm(slots, generator=g)[: len(lens)].to(device)
    return x, w, state, cu, idx


def test_varlen_prefill_with_and_without_initial_state(device: str) -> None:
    # lengths shorter than the window (1, 2) mix old state and new tokens in the new state
    lens = [1, 5, 2, 7]
    x, w, state, cu, idx = _case(40, lens, 6, device, torch.float32, 0)
    init = torch.tensor([True, False, True, True], device=device)
    ref_state = state.clone()
    ref = causal_conv1d_varlen_ref(x, w, ref_state, cu, idx, init)
    out = causal_conv1d_varlen(x, w, state, cu, idx, init, max(lens))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, ref_state, rtol=0, atol=0)


def test_decode_update(device: str) -> None:
    x, w, state, _, idx = _case(300, [1, 1, 1], 5, device, torch.float32, 1)
    ref_state = state.clone()
    cu = torch.arange(4, dtype=torch.int32, device=device)
    ref = causal_conv1d_varlen_ref(x, w, ref_state, cu, idx, torch.ones(3, dtype=torch.bool, device=device))
    out = causal_conv1d_update(x, w, state, idx)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, ref_state, rtol=0, atol=0)


@pytest.mark.gpu
def test_gpu_conv_27b_bf16() -> None:
    lens = [1, 70, 33, 3]
    x, w, state, cu, idx = _case(10240, lens, 8, "cuda", torch.bfloat16, 2)
    init = torch.tensor([True, True, False, True], device="cuda")
    ref_state = state.clone()
    ref = causal_conv1d_varlen_ref(x, w, ref_state, cu, idx, init)
    out = causal_conv1d_varlen(x, w, state, cu, idx, init, max(lens))
    torch.testing.assert_close(out, ref, rtol=2**-7, atol=1e-2)
    assert torch.equal(state, ref_state)
    xd = torch.randn(4, 10240, device="cuda", dtype=torch.bfloat16)
    cu1 = torch.arange(5, dtype=torch.int32, device="cuda")
    ref = causal_conv1d_varlen_ref(xd, w, ref_state, cu1, idx, torch.ones(4, dtype=torch.bool, device="cuda"))
    torch.testing.assert_close(causal_conv1d_update(xd, w, state, idx), ref, rtol=2**-7, atol=1e-2)
    assert torch.equal(state, ref_state)

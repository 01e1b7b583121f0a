"""The kernels against the project's own op references (fp4serve.ops.*, fp4serve.quant.nvfp4), whose contracts the
lead wires them behind: same arguments, same numbers (fp32 inputs, so only summation order differs)."""

from __future__ import annotations

import torch

from fp4serve.ops import attention, conv1d, gdn, norm
from fp4serve.ops.nvfp4 import nvfp4_linear_ref
from fp4serve.ops.triton import conv1d as k_conv1d
from fp4serve.ops.triton import gdn as k_gdn
from fp4serve.ops.triton import paged_attention as k_attn
from fp4serve.ops.triton import rmsnorm as k_norm
from fp4serve.ops.triton.nvfp4_gemm import nvfp4_dequant_ref, nvfp4_gemm, prepare_nvfp4_weight
from fp4serve.quant.nvfp4 import dequantize_weight, quantize_weight

TOL = {"rtol": 1e-5, "atol": 1e-5}


def test_nvfp4_matches_quant_and_linear_refs(device: str) -> None:
    g = torch.Generator().manual_seed(0)
    q = quantize_weight(torch.randn(40, 96, generator=g))
    w, s, gs = q.weight.to(device), q.weight_scale.to(device), q.weight_scale_2.to(device)
    assert torch.equal(nvfp4_dequant_ref(w, s, gs), dequantize_weight(w, s, gs))
    x = torch.randn(3, 96, generator=g).to(device)
    torch.testing.assert_close(nvfp4_gemm(x, prepare_nvfp4_weight(w, s, gs)), nvfp4_linear_ref(x, w, s, gs), **TOL)


def test_norms_match_ops_norm(device: str) -> None:
    g = torch.Generator().manual_seed(1)
    x, r, z = (torch.randn(6, 40, generator=g).to(device) for _ in range(3))
    w = (torch.randn(40, generator=g) * 0.1).to(device)
    torch.testing.assert_close(k_norm.rmsnorm(x, w, 1e-6), norm.rms_norm_ref(x, w, 1e-6), **TOL)
    y, new_r = k_norm.rmsnorm(x, w, 1e-6, r)
    torch.testing.assert_close(new_r, x + r, rtol=0, atol=0)
    torch.testing.assert_close(y, norm.rms_norm_ref(x + r, w, 1e-6), **TOL)
    torch.testing.assert_close(k_norm.gated_rmsnorm(x, z, w, 1e-6), norm.gated_rms_norm_ref(x, z, w, 1e-6), **TOL)


def test_conv1d_matches_ops_conv1d(device: str) -> None:
    g = torch.Generator().manual_seed(2)
    c, lens = 24, [3, 1, 6]
    x = torch.randn(sum(lens), c, generator=g).to(device)
    w = torch.randn(c, 4, generator=g).to(device)
    state = torch.randn(5, c, 3, generator=g).to(device)
    cu = torch.tensor([0, 3, 4, 10], dtype=torch.int32, device=device)
    idx = torch.tensor([4, 0, 2], device=device)
    init = torch.tensor([True, False, True], device=device)
    s_ref, s_k = state.clone(), state.clone()
    ref = conv1d.causal_conv1d_ref(x, w, s_ref, cu, idx, init)
    torch.testing.assert_close(k_conv1d.causal_conv1d_varlen(x, w, s_k, cu, idx, init, 6), ref, **TOL)
    torch.testing.assert_close(s_k, s_ref, rtol=0, atol=0)
    xd = torch.randn(3, c, generator=g).to(device)
    ref = conv1d.causal_conv1d_update_ref(xd, w, s_ref, idx, init)
    torch.testing.assert_close(k_conv1d.causal_conv1d_update(xd, w, s_k, idx, init), ref, **TOL)
    torch.testing.assert_close(s_k, s_ref, rtol=0, atol=0)


def test_gdn_matches_ops_gdn(device: str) -> None:
    g = torch.Generator().manual_seed(3)
    h, hv, dk, dv, lens = 2, 6, 16, 32, [2, 1, 3]
    t = sum(lens)
    q = norm.l2_norm_ref(torch.randn(t, h, dk, generator=g)).to(device)
    k = norm.l2_norm_ref(torch.randn(t, h, dk, generator=g)).to(device)
    v = torch.randn(t, hv, dv, generator=g).to(device)
    gate = (-torch.rand(t, hv, generator=g)).to(device)
    beta = torch.rand(t, hv, generator=g).to(device)
    state = (torch.randn(4, hv, dk, dv, generator=g) * 0.1).to(device)
    cu = torch.tensor([0, 2, 3, 6], dtype=torch.int32, device=device)
    idx = torch.tensor([3, 1, 0], device=device)
    init = torch.tensor([True, False, True], device=device)
    s_ref, s_k = state.clone(), state.clone()
    ref = gdn.gated_delta_rule_recurrent_ref(q, k, v, gate, beta, s_ref, cu, idx, init, dk**-0.5)
    out = k_gdn.gated_delta_rule_recurrent(q, k, v, gate, beta, s_k, cu, idx, init, dk**-0.5)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s_k, s_ref, rtol=1e-4, atol=1e-5)


def test_paged_decode_matches_ops_attention(device: str) -> None:
    g = torch.Generator().manual_seed(4)
    lens = [5, 33]
    kv = torch.randn(2, 12, 8, 2, 32, generator=g).to(device)
    tables = torch.tensor([[3, 7, 0, 0, 0], [1, 2, 4, 5, 9]], dtype=torch.int32, device=device)
    q = torch.randn(2, 4, 32, generator=g).to(device)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    cu = torch.arange(3, dtype=torch.int32, device=device)
    ref = attention.paged_attention_ref(q, kv, cu, seq_lens, tables, 32**-0.5)
    out = k_attn.paged_decode_attention(q, kv, tables, seq_lens, 32**-0.5, max_seq_len=33, num_splits=2)
    torch.testing.assert_close(out, ref, **TOL)

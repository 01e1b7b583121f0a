"""The public ops with their kernels wired in, against the ops references, with the arguments the model passes.

Without CUDA the `use_kernels` test in each ops module is switched on for CPU tensors, so the real kernels run in
Triton's interpreter (set up by this directory's conftest): that checks the wiring (argument order, layouts,
strided views, derived `cu_seqlens`, split counts) the GPU takes, with fp32 data. With CUDA the ops dispatch on
their own. NVFP4Linear's in-place repack of its weight buffer (and every way back to the checkpoint's packing) is
checked here too, since it needs the kernel module.
"""

from __future__ import annotations

import pytest
import torch

from fp4serve.model.linear import NVFP4Linear
from fp4serve.ops import attention, conv1d, gdn, norm, nvfp4
from fp4serve.ops.nvfp4 import checkpoint_packing, nvfp4_linear_ref
from fp4serve.ops.triton.nvfp4_gemm import nvfp4_gemm, prepare_nvfp4_weight
from fp4serve.quant.nvfp4 import quantize_weight

TOL = {"rtol": 1e-4, "atol": 1e-5}


@pytest.fixture
def kernels(device: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The device, with the ops dispatching to Triton for its tensors (the interpreter on CPU)."""
    if device == "cpu":
        for module in (norm, conv1d, gdn, attention, nvfp4):
            monkeypatch.setattr(module, "use_kernels", lambda x: True)
    return device


def randn(*shape: int, gen: torch.Generator, device: str, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * scale).to(device)


def test_norms(kernels: str) -> None:
    g = torch.Generator().manual_seed(0)
    x, r = randn(5, 40, gen=g, device=kernels), randn(5, 40, gen=g, device=kernels)
    w = randn(40, gen=g, device=kernels, scale=0.1)
    torch.testing.assert_close(norm.rms_norm(x, w, 1e-6), norm.rms_norm_ref(x, w, 1e-6), **TOL)
    y, h = norm.rms_norm_residual(x, r, w, 1e-6)
    y_ref, h_ref = norm.rms_norm_residual_ref(x, r, w, 1e-6)
    assert torch.equal(h, h_ref)
    torch.testing.assert_close(y, y_ref, **TOL)
    # the attention q/k norms get a strided view: [N, H, 2, D] split into query and gate halves
    qg = randn(3, 4, 2, 32, gen=g, device=kernels)
    q = qg.unbind(dim=2)[0]
    wq = randn(32, gen=g, device=kernels, scale=0.1)
    torch.testing.assert_close(norm.rms_norm(q, wq, 1e-6), norm.rms_norm_ref(q, wq, 1e-6), **TOL)
    z = randn(3, 4, 32, gen=g, device=kernels)
    o = randn(3, 4, 32, gen=g, device=kernels)
    torch.testing.assert_close(norm.gated_rms_norm(o, z, wq, 1e-6), norm.gated_rms_norm_ref(o, z, wq, 1e-6), **TOL)


@pytest.mark.parametrize("pass_max_seqlen", [True, False])
def test_conv1d(kernels: str, pass_max_seqlen: bool) -> None:
    g = torch.Generator().manual_seed(1)
    c, lens = 40, [5, 1, 3]
    x = randn(sum(lens), c, gen=g, device=kernels)
    w = randn(c, 4, gen=g, device=kernels)
    state = randn(6, c, 3, gen=g, device=kernels)
    cu = torch.tensor([0, 5, 6, 9], dtype=torch.int32, device=kernels)
    idx = torch.tensor([5, 0, 2], device=kernels)
    init = torch.tensor([True, False, True], device=kernels)
    s_ref, s_op = state.clone(), state.clone()
    ref = conv1d.causal_conv1d_ref(x, w, s_ref, cu, idx, init)
    out = conv1d.causal_conv1d(x, w, s_op, cu, idx, init, max_seqlen=5 if pass_max_seqlen else None)
    torch.testing.assert_close(out, ref, **TOL)
    assert torch.equal(s_op, s_ref)
    xd = randn(3, c, gen=g, device=kernels)
    ref = conv1d.causal_conv1d_update_ref(xd, w, s_ref, idx, init)
    torch.testing.assert_close(conv1d.causal_conv1d_update(xd, w, s_op, idx, init), ref, **TOL)
    assert torch.equal(s_op, s_ref)


def _gdn_inputs(lens: list[int], device: str, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hk, hv, dk, dv = 2, 4, 16, 32
    n = sum(lens)
    # q, k, v as views of one conv output, as the model slices them
    mixed = randn(n, 2 * hk * dk + hv * dv, gen=g, device=device)
    q, k, v = mixed.split([hk * dk, hk * dk, hv * dv], dim=-1)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return {
        "q": q.view(n, hk, dk),
        "k": k.view(n, hk, dk),
        "v": v.view(n, hv, dv),
        "a": randn(n, hv, gen=g, device=device),
        "b": randn(n, hv, gen=g, device=device),
        "A_log": randn(hv, gen=g, device=device, scale=0.5),
        "dt_bias": randn(hv, gen=g, device=device),
        "state": randn(5, hv, dk, dv, gen=g, device=device, scale=0.1),
        "cu": cu,
        "idx": torch.randperm(5, generator=g)[: len(lens)].to(device),
        "init": (torch.arange(len(lens)) % 2 == 0).to(device),
    }


def test_gdn_prefill_and_decode(kernels: str) -> None:
    t = _gdn_inputs([3, 1, 4], kernels, 2)
    qn, kn = norm.l2_norm_ref(t["q"]), norm.l2_norm_ref(t["k"])
    g, beta = gdn.gdn_gates_ref(t["a"], t["b"], t["A_log"], t["dt_bias"])
    args = (qn, kn, t["v"], g, beta)
    s_ref, s_op = t["state"].clone(), t["state"].clone()
    ref = gdn.chunk_gated_delta_rule_ref(*args, s_ref, t["cu"], t["idx"], t["init"], 0.25)
    out = gdn.chunk_gated_delta_rule(*args, s_op, t["cu"], t["idx"], t["init"], 0.25)
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(s_op, s_ref, **TOL)

    d = _gdn_inputs([1, 1, 1], kernels, 3)
    raw = (d["q"], d["k"], d["v"], d["a"], d["b"], d["A_log"], d["dt_bias"])
    s_ref, s_op = d["state"].clone(), d["state"].clone()
    ref = gdn.gated_delta_rule_decode_ref(*raw, s_ref, d["idx"], d["init"], 0.25)
    out = gdn.gated_delta_rule_decode(*raw, s_op, d["idx"], d["init"], 0.25)
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(s_op, s_ref, **TOL)
    qn, kn = norm.l2_norm_ref(d["q"]), norm.l2_norm_ref(d["k"])
    g, beta = gdn.gdn_gates_ref(d["a"], d["b"], d["A_log"], d["dt_bias"])
    out = gdn.recurrent_gated_delta_rule(qn, kn, d["v"], g, beta, s_op, d["idx"], d["init"], 0.25)
    ref = gdn.gated_delta_rule_step_ref(qn, kn, d["v"], g, beta, s_ref, d["idx"], d["init"], 0.25)
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(s_op, s_ref, **TOL)


def test_paged_attention_decode_and_prefill(kernels: str) -> None:
    g = torch.Generator().manual_seed(4)
    kv = randn(2, 12, 4, 2, 32, gen=g, device=kernels)
    tables = torch.tensor([[3, 7, 0, 0], [1, 2, 4, 5], [9, 0, 0, 0]], dtype=torch.int32, device=kernels)
    seq_lens = torch.tensor([6, 15, 1], dtype=torch.int32, device=kernels)
    # decode: one query per sequence
    q = randn(3, 4, 32, gen=g, device=kernels)
    cu = torch.arange(4, dtype=torch.int32, device=kernels)
    ref = attention.paged_attention_ref(q, kv, cu, seq_lens, tables, 32**-0.5)
    torch.testing.assert_close(attention.paged_attention(q, kv, cu, seq_lens, tables, 32**-0.5), ref, **TOL)
    # mixed: a decode row, a chunk after cached context, a fresh one-token prompt
    q = randn(1 + 5 + 1, 4, 32, gen=g, device=kernels)
    cu = torch.tensor([0, 1, 6, 7], dtype=torch.int32, device=kernels)
    ref = attention.paged_attention_ref(q, kv, cu, seq_lens, tables, 32**-0.5)
    torch.testing.assert_close(attention.paged_attention(q, kv, cu, seq_lens, tables, 32**-0.5), ref, **TOL)


def _nvfp4(n: int, k: int, device: str, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = quantize_weight(torch.randn(n, k, generator=g) * 0.05)
    return q.weight.to(device), q.weight_scale.to(device), q.weight_scale_2.to(device)


@pytest.mark.parametrize("m", [1, 3])
def test_nvfp4_linear(kernels: str, m: int) -> None:
    w, s, gs = _nvfp4(24, 64, kernels, m)
    x = torch.randn(m, 64, generator=torch.Generator().manual_seed(m)).to(kernels)
    ref = nvfp4_linear_ref(x.double(), w, s, gs)
    for dtype in (torch.bfloat16, torch.float16):
        out = nvfp4.nvfp4_linear(x.to(dtype), w, s, gs)
        assert out.dtype == dtype
        assert float((out.double() - ref).norm() / ref.norm()) < 1e-2


def test_checkpoint_packing_inverts_the_kernel_repack() -> None:
    w = torch.randint(0, 256, (7, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    s = torch.ones(7, 6).to(torch.float8_e4m3fn)
    repacked = prepare_nvfp4_weight(w, s, torch.tensor(1.0)).weight
    assert not torch.equal(repacked, w)
    assert torch.equal(checkpoint_packing(repacked), w)


def test_linear_repacks_in_place_and_gives_checkpoint_bytes_back(device: str) -> None:
    g = torch.Generator().manual_seed(6)
    layer = NVFP4Linear.from_quantized(quantize_weight(torch.randn(32, 64, generator=g) * 0.05)).to(device)
    original = layer.weight.clone()
    sd = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(2, 64, generator=g).to(device)
    before = layer(x)

    kw = layer.kernel_weight()
    buffer = layer.weight
    assert kw.weight.data_ptr() == buffer.data_ptr() and not torch.equal(buffer, original)
    assert layer.kernel_weight() is kw
    assert torch.equal(layer.checkpoint_weight(), original)
    assert torch.equal(layer.state_dict()["weight"], original)
    assert torch.equal(layer(x), before)
    ref = nvfp4_linear_ref(x, original, layer.weight_scale, layer.weight_scale_2)
    torch.testing.assert_close(nvfp4_gemm(x, kw), ref, **TOL)

    # moving or casting the module hands over the checkpoint's packing
    layer.to(device)
    assert torch.equal(layer.weight, original) and layer._kernel is None
    layer.kernel_weight()
    layer.load_state_dict(sd)
    assert torch.equal(layer.weight, original) and torch.equal(layer.checkpoint_weight(), original)
    # a loader writing the buffer in place also means checkpoint bytes
    layer.kernel_weight()
    layer.weight.copy_(original)
    assert torch.equal(layer.checkpoint_weight(), original)
    assert torch.equal(layer(x), before)


@pytest.mark.gpu
def test_gpu_linear_runs_the_kernel_on_its_own_buffer() -> None:
    g = torch.Generator().manual_seed(7)
    layer = NVFP4Linear.from_quantized(quantize_weight(torch.randn(1000, 784, generator=g) * 0.05)).cuda()
    original = layer.weight.clone()
    allocated = torch.cuda.memory_allocated()
    kw = layer.kernel_weight()
    # the repack reuses the buffer: no second copy of the weight stays allocated
    assert torch.cuda.memory_allocated() == allocated
    assert kw.weight.data_ptr() == layer.weight.data_ptr() and not torch.equal(layer.weight, original)
    for m in (1, 5, 70):
        x = torch.randn(m, 784, generator=g).cuda()
        ref = nvfp4_linear_ref(x.double(), original, layer.weight_scale, layer.weight_scale_2)
        out = layer(x.bfloat16())
        assert out.dtype == torch.bfloat16
        assert float((out.double() - ref).norm() / ref.norm()) < 1e-2
    assert layer.kernel_weight() is kw
    assert torch.equal(layer.cpu().weight, original.cpu())


@pytest.mark.gpu
def test_gpu_gdn_prefill_bf16_27b_heads() -> None:
    """The bf16 prefill path (fla-core's chunked kernel when importable) against the float64 loop."""
    g = torch.Generator().manual_seed(8)
    hk, hv, dk, dv, lens = 16, 48, 128, 128, [1, 130, 7]
    n = sum(lens)
    q = norm.l2_norm_ref(torch.randn(n, hk, dk, generator=g)).cuda()
    k = norm.l2_norm_ref(torch.randn(n, hk, dk, generator=g)).cuda()
    v = torch.randn(n, hv, dv, generator=g).cuda().bfloat16()
    gate, beta = gdn.gdn_gates_ref(
        torch.randn(n, hv, generator=g), torch.randn(n, hv, generator=g), torch.zeros(hv), torch.ones(hv)
    )
    state = (torch.randn(4, hv, dk, dv, generator=g) * 0.1).cuda()
    cu = torch.tensor([0, 1, 131, 138], dtype=torch.int32, device="cuda")
    idx = torch.tensor([2, 0, 3], device="cuda")
    init = torch.tensor([True, False, True], device="cuda")
    s_ref, s_op = state.double(), state.clone()
    ref = gdn.gated_delta_rule_recurrent_ref(
        q.double(), k.double(), v.double(), gate.cuda().double(), beta.cuda().double(), s_ref, cu, idx, init, dk**-0.5
    )
    out = gdn.chunk_gated_delta_rule(q, k, v, gate.cuda(), beta.cuda(), s_op, cu, idx, init, dk**-0.5)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(s_op.double(), s_ref, rtol=2e-2, atol=5e-3)

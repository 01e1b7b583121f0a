"""The random-weight model: valid NVFP4 tensors at the intended scale, every tensor filled, finite through depth."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fp4serve.bench.engine_bench import EngineBench, Workload, make_engine
from fp4serve.bench.geometry import geometry_config, text_config
from fp4serve.bench.random_model import BF16_KEPT, build_random_model
from fp4serve.model.linear import NVFP4Linear


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_nvfp4_weights_are_valid_and_scaled():
    config = text_config(geometry_config("tiny"))
    model = build_random_model(config, quant="nvfp4", device="cpu", dtype=torch.float32, seed=3)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, NVFP4Linear)}
    plain = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m) is nn.Linear}
    assert linears and plain == set(BF16_KEPT)
    for name, m in linears.items():
        scales = m.weight_scale.float()
        assert torch.isfinite(scales).all() and (scales >= 32).all() and (scales <= 448).all(), name
        assert m.weight_scale_2.item() > 0 and m.input_scale.item() > 0
        # both nibbles of the packed bytes take every code
        assert (m.weight & 0x0F).unique().numel() == 16 and (m.weight >> 4).unique().numel() == 16, name
        w = m.dequantized_weight(torch.float32)
        assert w.std().item() == pytest.approx(1 / math.sqrt(m.in_features), rel=0.15), name
    # the same seed gives the same model, another seed another one
    again = build_random_model(config, quant="nvfp4", device="cpu", dtype=torch.float32, seed=3)
    other = build_random_model(config, quant="nvfp4", device="cpu", dtype=torch.float32, seed=4)
    for (name, t), t2 in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(t.float(), t2.float()), name
    assert not torch.equal(model.lm_head.weight, other.lm_head.weight)


def test_every_tensor_is_filled():
    # to_empty leaves garbage; a fill rule must exist for every tensor (a NaN pattern would survive otherwise)
    config = text_config(geometry_config("tiny"))
    for quant in ("nvfp4", "bf16"):
        model = build_random_model(config, quant=quant, device="cpu", dtype=torch.float32)
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            assert torch.isfinite(t.float()).all(), name


def test_deep_random_model_stays_finite_through_the_engine():
    config = text_config(geometry_config("tiny", num_layers=16))
    model = build_random_model(config, quant="nvfp4", device="cpu", dtype=torch.float32)
    workload = Workload(
        batch_sizes=(2,), context_len=8, warmup_steps=0, decode_steps=2, prefill_prompts=1, prefill_len=8,
        ttft_len=8, max_num_batched_tokens=64, block_size=16,
    )  # fmt: skip
    engine = make_engine(
        model, workload, device=torch.device("cpu"), dtype=torch.float32, enforce_eager=True,
        max_position_embeddings=4096,
    )  # fmt: skip
    bench = EngineBench(engine, vocab_size=config.vocab_size)
    assert bench.check_finite(prompt_len=12)
    result = bench.decode(batch=2, context_len=8, warmup=0, steps=2, max_tokens=workload.decode_max_tokens(2))
    assert len(result.step_s) == 2 and result.tok_s > 0
    assert not engine.has_unfinished() and engine.stats().used_kv_blocks == 0


def test_a_decode_that_cannot_run_full_batches_fails_loudly_and_is_cleaned_up():
    config = text_config(geometry_config("tiny"))
    model = build_random_model(config, quant="nvfp4", device="cpu", dtype=torch.float32)
    # a 3-token step budget cannot decode 4 sequences at once: the timed steps would not be what they claim
    workload = Workload(
        batch_sizes=(4,), context_len=4, warmup_steps=0, decode_steps=2, prefill_prompts=1, prefill_len=4,
        ttft_len=4, max_num_batched_tokens=3, block_size=16,
    )  # fmt: skip
    engine = make_engine(
        model, workload, device=torch.device("cpu"), dtype=torch.float32, enforce_eager=True,
        max_position_embeddings=4096,
    )  # fmt: skip
    bench = EngineBench(engine, vocab_size=config.vocab_size)
    with pytest.raises(RuntimeError, match="decode batch 4"):
        bench.decode(batch=4, context_len=4, warmup=0, steps=2, max_tokens=workload.decode_max_tokens(4))
    assert engine.has_unfinished()
    bench.abort_all()
    assert not engine.has_unfinished() and engine.stats().used_state_slots == 0
    assert len(bench.ttft(prompt_len=3, warmup=0, runs=1)) == 1

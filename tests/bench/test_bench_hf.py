"""The transformers baseline on the tiny geometry: same shapes as our model, positive timings."""

from __future__ import annotations

import pytest
import torch

from fp4serve.bench import hf_bench
from fp4serve.bench.geometry import geometry_config, text_config
from fp4serve.bench.random_model import meta_model
from fp4serve.bench.roofline import footprint

pytestmark = pytest.mark.skipif(hf_bench.transformers_version() is None, reason="transformers with Qwen3.5 missing")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_transformers_baseline_runs_on_the_same_geometry():
    config_dict = geometry_config("tiny")
    config = text_config(config_dict)
    device = torch.device("cpu")
    model = hf_bench.build_hf_model(config_dict, device=device, dtype=torch.float32, seed=0)
    ours = meta_model(config, quant="bf16", dtype=torch.float32)
    kw = dict(state_bytes_per_seq=1, kv_bytes_per_token=1)
    theirs_fp, ours_fp = footprint(model, config, **kw), footprint(ours, config, **kw)
    assert theirs_fp.matmul_params == ours_fp.matmul_params and theirs_fp.lm_head_params == ours_fp.lm_head_params
    assert theirs_fp.embedding_bytes == ours_fp.embedding_bytes

    bench = hf_bench.HFBench(model, device=device, vocab_size=config.vocab_size)
    decode = bench.decode(batch=2, context_len=8, warmup=1, steps=2)
    assert len(decode.step_s) == 2 and decode.tok_s > 0 and decode.mean_context_len == 8 + 1 + 0.5
    prefill = bench.prefill(num_prompts=2, prompt_len=16, warmup=0, runs=1)
    assert prefill.tok_s > 0
    assert len(bench.ttft(prompt_len=16, warmup=0, runs=2)) == 2

"""The engine on a GPU: memory planning from gpu_memory_utilization (profile run) and batched = alone on CUDA.

The checkpoint is a tiny random Qwen3.5 written by transformers (test-only use), so the test needs no fixture.
"""

from __future__ import annotations

import pytest
import torch

from fp4serve.config import EngineConfig
from fp4serve.engine.engine import Engine, read_max_position_embeddings
from fp4serve.model.loader import load_model
from fp4serve.sampling import SamplingParams

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    torch.manual_seed(0)
    config = Qwen3_5TextConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=32,
        linear_value_head_dim=32,
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
        max_position_embeddings=8192,
        initializer_range=0.2,
        eos_token_id=None,
        pad_token_id=None,
    )
    path = tmp_path_factory.mktemp("tiny-qwen35")
    Qwen3_5ForCausalLM(config).save_pretrained(path)
    return path


def run(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    out: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
        out[str(i)] = []
    while engine.has_unfinished():
        for d in engine.step():
            out[d.request_id] += d.new_token_ids
    return [out[str(i)] for i in range(len(prompts))]


def test_gpu_memory_utilization_bounds_the_instance_and_batching_keeps_greedy_tokens(checkpoint):
    torch.cuda.empty_cache()
    total = torch.cuda.mem_get_info()[1]
    model = load_model(checkpoint, device="cuda", dtype=torch.float32, progress=False)
    max_pos = read_max_position_embeddings(checkpoint)
    # 1 GiB worth of the card: weights + profile peak + caches must stay inside it
    utilization = round(2**30 / total, 4)
    config = EngineConfig.create(
        device="cuda",
        dtype="float32",
        gpu_memory_utilization=utilization,
        max_num_seqs=32,
        max_num_batched_tokens=2048,
        max_model_len=-1,
    )
    engine = Engine(model, config, max_position_embeddings=max_pos)
    assert engine.max_model_len == max_pos == 8192
    assert torch.cuda.memory_allocated() <= utilization * total
    assert torch.cuda.max_memory_allocated() <= utilization * total
    with pytest.raises(ValueError, match="largest max_model_len that fits"):
        tight = EngineConfig.create(device="cuda", dtype="float32", kv_cache_memory_bytes="4MiB", max_num_seqs=4)
        Engine(model, tight, max_position_embeddings=max_pos)

    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 512, (3 + 11 * i,), generator=gen).tolist() for i in range(12)]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    batched = run(engine, prompts, params)
    alone = [run(engine, [p], params)[0] for p in prompts]
    assert batched == alone
    stats = engine.stats()
    assert stats.used_kv_blocks == 0 and stats.used_state_slots == 0

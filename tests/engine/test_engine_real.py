"""The engine on the real model (the trained demo Qwen3.5 fixture, float32 on CPU).

Batching must not change greedy tokens: requests arriving at different steps, split into prefill chunks and
preempted for lack of KV blocks, produce exactly what each produces alone with the whole prompt in one step. A
random run with aborts must leave every block and slot free. Memory planning is checked against the model's own
byte counts, and 8 concurrent requests must finish well before 8 sequential ones.
"""

from __future__ import annotations

import random
import time

import pytest
import torch

from fp4serve.config import EngineConfig
from fp4serve.engine.engine import Engine
from fp4serve.model.loader import load_model
from fp4serve.sampling import SamplingParams
from fp4serve.tokenizer import Tokenizer

F32 = torch.float32


@pytest.fixture(scope="module")
def demo_dir(shared_dir):
    return shared_dir / "fixtures" / "austen-qwen35-demo"


@pytest.fixture(scope="module")
def model(demo_dir):
    # tiny ops: one thread avoids OpenMP hand-offs that cost more than the work on a shared 2-core machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_model(demo_dir, dtype=F32, progress=False)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def prompts(demo_dir):
    tokenizer = Tokenizer.from_dir(demo_dir)
    text = (demo_dir.parent.parent / "corpus" / "austen" / "persuasion.txt").read_text()[5000:40000]
    ids = tokenizer.encode(text)
    rng = random.Random(3)
    lengths = [1, 2, 5, 9, 15, 16, 17, 23, 31, 40, 47, 55, 3, 12, 28, 60]
    out = []
    for n in lengths:
        start = rng.randrange(len(ids) - n)
        out.append(ids[start : start + n])
    return out


def engine_for(model, *, max_num_seqs: int, budget: int, num_blocks: int | None = None, max_model_len=96) -> Engine:
    kwargs = {}
    if num_blocks is not None:
        state = model.state_bytes_per_slot(F32) * (max_num_seqs + 1)
        kwargs["kv_cache_memory_bytes"] = state + num_blocks * 16 * model.kv_bytes_per_token(F32)
    else:
        kwargs["kv_cache_memory_bytes"] = "256MiB"
    config = EngineConfig.create(
        device="cpu",
        dtype="float32",
        block_size=16,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget,
        max_model_len=max_model_len,
        **kwargs,
    )
    return Engine(model, config, eos_token_ids=(248046,), max_position_embeddings=4096)


def drain(engine: Engine, arrivals: dict[int, list[tuple[str, list[int], SamplingParams]]]) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    step = 0
    while arrivals or engine.has_unfinished():
        for args in arrivals.pop(step, []):
            engine.add_request(*args)
            tokens[args[0]] = []
        for d in engine.step():
            tokens[d.request_id] += d.new_token_ids
        step += 1
    return tokens


def test_batched_chunked_preempted_greedy_equals_alone(model, prompts):
    params = [SamplingParams(temperature=0.0, max_tokens=3 + (5 * i) % 8, ignore_eos=True) for i in range(16)]
    alone_engine = engine_for(model, max_num_seqs=1, budget=128)
    alone = {}
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        alone.update(drain(alone_engine, {0: [(f"r{i}", prompt, p)]}))
    # chunks of at most 16 tokens per step, 8 sequences, 7 blocks of 16 tokens: far less than 8 x 70 tokens
    engine = engine_for(model, max_num_seqs=8, budget=16, num_blocks=7)
    arrivals: dict[int, list] = {}
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        arrivals.setdefault([0, 0, 1, 2, 3, 5, 8, 9, 9, 12, 15, 16, 20, 21, 30, 31][i], []).append((f"r{i}", prompt, p))
    batched = drain(engine, arrivals)
    assert engine.stats().num_preemptions > 0, "the cache was meant to be too small for all running requests"
    for rid, expected in alone.items():
        assert batched[rid] == expected, rid
    stats = engine.stats()
    assert stats.used_kv_blocks == 0 and stats.used_state_slots == 0


def test_random_requests_with_aborts_free_everything(model, prompts):
    engine = engine_for(model, max_num_seqs=6, budget=24, num_blocks=6)
    rng = random.Random(11)
    ended: dict[str, str] = {}
    aborted: set[str] = set()
    submitted, live = 0, []
    while submitted < 24 or engine.has_unfinished():
        for _ in range(rng.choice([1, 2, 3]) if submitted < 24 else 0):
            rid = f"q{submitted}"
            params = SamplingParams(temperature=rng.choice([0.0, 0.8]), seed=submitted, max_tokens=rng.randint(1, 6))
            engine.add_request(rid, rng.choice(prompts), params)
            live.append(rid)
            submitted += 1
        if live and rng.random() < 0.2:
            rid = live.pop(rng.randrange(len(live)))
            if engine.abort(rid):
                aborted.add(rid)
        for d in engine.step():
            if d.finish_reason is not None:
                assert d.request_id not in ended
                ended[d.request_id] = d.finish_reason
        live = [r for r in live if r not in ended]
    assert len(ended) == 24 and {r for r, f in ended.items() if f == "abort"} == aborted and aborted
    stats = engine.stats()
    assert stats.used_kv_blocks == 0 and stats.used_state_slots == 0 and stats.num_preemptions > 0


def test_max_model_len_auto_fits_the_cpu_budget(model):
    state = model.state_bytes_per_slot(F32) * 5
    block = 16 * model.kv_bytes_per_token(F32)
    config = EngineConfig.create(
        device="cpu", max_num_seqs=4, kv_cache_memory_bytes=state + 100 * block + 5, max_model_len=-1
    )
    engine = Engine(model, config, max_position_embeddings=4096)
    assert engine.max_model_len == 1600 and engine.stats().total_kv_blocks == 100
    full = EngineConfig.create(
        device="cpu", max_num_seqs=4, kv_cache_memory_bytes=state + 400 * block, max_model_len="auto"
    )
    assert Engine(model, full, max_position_embeddings=4096).max_model_len == 4096
    with pytest.raises(ValueError, match="largest max_model_len that fits is 1600"):
        Engine(
            model,
            EngineConfig.create(device="cpu", max_num_seqs=4, kv_cache_memory_bytes=state + 100 * block),
            max_position_embeddings=4096,
        )
    with pytest.raises(ValueError, match="too small"):
        Engine(
            model,
            EngineConfig.create(device="cpu", max_num_seqs=4, kv_cache_memory_bytes=state, max_model_len=-1),
            max_position_embeddings=4096,
        )


def test_concurrent_requests_finish_faster_than_sequential(model, prompts, record_property):
    engine = engine_for(model, max_num_seqs=8, budget=256)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    requests = [(f"s{i}", prompts[4 + i], params) for i in range(8)]
    drain(engine, {0: [("warmup", prompts[0], params)]})
    start = time.perf_counter()
    sequential = {}
    for rid, prompt, p in requests:
        sequential.update(drain(engine, {0: [(rid, prompt, p)]}))
    t_sequential = time.perf_counter() - start
    start = time.perf_counter()
    concurrent = drain(engine, {0: [(rid.replace("s", "c"), prompt, p) for rid, prompt, p in requests]})
    t_concurrent = time.perf_counter() - start
    record_property("sequential_s", round(t_sequential, 3))
    record_property("concurrent_s", round(t_concurrent, 3))
    print(f"8 requests x 12 tokens: sequential {t_sequential:.2f} s, concurrent {t_concurrent:.2f} s")
    assert [concurrent[r.replace("s", "c")] for r, _, _ in requests] == [sequential[r] for r, _, _ in requests]
    assert t_concurrent < 0.6 * t_sequential

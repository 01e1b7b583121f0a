"""Decode on padded static buffers and CUDA graphs (cuda_graphs.py).

On CPU the padded path runs without capture (`setup_decode_graphs(capture=False)`): the fake model checks every
row's slots, block table, state slot, flag and position each step (padding rows included), and the real tiny model
must give the same tokens as the plain path while its padding rows touch only the spare state slot and the null
KV block. On a GPU: eager and graph decode give identical greedy tokens for requests of different lengths that
finish at different times (so the batch moves across buckets), on the tiny geometry and on a 27B-width slice;
and the model's GPU path (Triton kernels, bf16) agrees with the CPU reference path on the same NVFP4 weights.
"""

from __future__ import annotations

import random

import pytest
import torch
from engine_fakes import FakeConfig, FakeModel, greedy, next_token

from fp4serve.bench.geometry import geometry_config, text_config
from fp4serve.bench.random_model import build_random_model, meta_model
from fp4serve.config import EngineConfig
from fp4serve.engine.batch import ForwardBatch
from fp4serve.engine.cuda_graphs import graph_buckets
from fp4serve.engine.engine import Engine
from fp4serve.engine.memory import CachePlan
from fp4serve.sampling import SamplingParams


def test_buckets() -> None:
    assert graph_buckets(1) == (1,)
    assert graph_buckets(3) == (1, 2, 3)
    assert graph_buckets(8) == (1, 2, 4, 8)
    assert graph_buckets(20) == (1, 2, 4, 8, 16, 20)
    assert graph_buckets(32) == (1, 2, 4, 8, 16, 24, 32)


def _padded(engine: Engine) -> Engine:
    runner = engine.runner
    plan = CachePlan(
        num_blocks=runner.null_block,
        block_size=runner.block_size,
        num_slots=runner.pad_slot + 1,
        max_model_len=engine.max_model_len,
        kv_bytes=0,
        state_bytes=0,
    )
    runner.setup_decode_graphs(plan, capture=False)
    return engine


def _run(engine: Engine, specs: list[tuple[str, list[int], SamplingParams]]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {rid: [] for rid, _, _ in specs}
    step = 0
    # staggered arrivals: decode steps, prefill chunks and mixed steps all happen
    while step < 2 * len(specs) or engine.has_unfinished():
        if step % 2 == 0 and step // 2 < len(specs):
            engine.add_request(*specs[step // 2])
        for d in engine.step():
            out[d.request_id] += d.new_token_ids
        step += 1
    return out


def test_fake_model_checks_every_padded_row() -> None:
    model = FakeModel(FakeConfig(vocab_size=64, max_position_embeddings=256))
    config = EngineConfig.create(
        device="cpu",
        dtype="float32",
        block_size=4,
        max_num_seqs=12,
        max_num_batched_tokens=16,
        kv_cache_memory_bytes=model.state_bytes_per_slot(torch.float32) * 13 + 40 * 4 * 8,
        max_model_len=128,
    )
    engine = _padded(Engine(model, config, eos_token_ids=(0,)))
    rng = random.Random(2)
    specs = []
    for k in range(14):
        prompt = [rng.randrange(1, 64) for _ in range(rng.choice([1, 2, 9, 17, 33]))]
        specs.append((f"r{k}", prompt, greedy(max_tokens=rng.randint(1, 30), ignore_eos=True)))
    got = _run(engine, specs)
    for rid, prompt, params in specs:
        history = list(prompt)
        for _ in range(params.max_tokens):
            history.append(next_token(history, 64))
        assert got[rid] == history[len(prompt) :], rid
    graphs = engine.runner.decode_graphs
    assert graphs is not None and graphs.num_steps > 10 and graphs.num_replays == 0
    assert engine.stats().num_preemptions > 0, "the cache was meant to be small enough to force preemption"


def _tiny_specs(vocab: int, lengths: list[int], max_tokens: list[int]) -> list[tuple[str, list[int], SamplingParams]]:
    gen = torch.Generator().manual_seed(3)
    return [
        (
            f"s{i}",
            torch.randint(0, vocab, (n,), generator=gen).tolist(),
            SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True),
        )
        for i, (n, m) in enumerate(zip(lengths, max_tokens, strict=True))
    ]


def _engine(model, *, device: str, dtype: str, max_num_seqs: int, enforce_eager: bool, max_model_len: int = 192):
    block_size = 16
    num_blocks = max_num_seqs * (max_model_len // block_size) + 4
    budget = model.state_bytes_per_slot(model.dtype) * (max_num_seqs + 1)
    budget += num_blocks * block_size * model.kv_bytes_per_token(model.dtype)
    config = EngineConfig.create(
        device=device,
        dtype=dtype,
        block_size=block_size,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=256,
        kv_cache_memory_bytes=budget,
        max_model_len=max_model_len,
        enforce_eager=enforce_eager,
    )
    return Engine(model, config, max_position_embeddings=4096)


@pytest.fixture
def one_thread():
    """Tiny matmuls: one intra-op thread avoids oversubscribing a busy 2-core CI machine (20x faster here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_padded_decode_of_the_real_model_matches_the_plain_path_and_writes_only_padding_places(one_thread) -> None:
    config = text_config(geometry_config("tiny", num_layers=4, vocab_size=256))
    model = build_random_model(config, quant="nvfp4", device="cpu", dtype=torch.float32, seed=1)
    specs = _tiny_specs(256, [3, 20, 7, 12], [5, 7, 3, 6])
    plain = _run(_engine(model, device="cpu", dtype="float32", max_num_seqs=8, enforce_eager=True), specs)
    engine = _padded(_engine(model, device="cpu", dtype="float32", max_num_seqs=8, enforce_eager=True))
    assert _run(engine, specs) == plain

    # one decode step of 3 sequences (bucket 4): compare the caches before and after
    for rid, prompt, _ in specs[:3]:
        engine.add_request(rid + "b", prompt, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    while any(r.num_computed_tokens < len(r.prompt_token_ids) for r in engine.scheduler.requests.values()):
        engine.step()
    running = list(engine.scheduler.requests.values())
    cache = engine.runner.cache
    before = [None if t is None else t.clone() for t in (*cache.kv, *cache.conv, *cache.ssm)]
    steps = engine.runner.decode_graphs.num_steps
    engine.step()
    assert engine.runner.decode_graphs.num_steps == steps + 1
    slots = {r.state_slot for r in running} | {engine.runner.pad_slot}
    blocks = {b for r in running for b in r.block_table} | {engine.runner.null_block}
    for old, new in zip(before, (*cache.kv, *cache.conv, *cache.ssm), strict=True):
        if old is None:
            continue
        if old.dim() == 5:  # KV [2, blocks, ...]
            changed = {int(b) for b in (old != new).flatten(2).any(-1).any(0).nonzero().flatten()}
            assert changed <= blocks
            # padding rows wrote the null block (the same K/V every step, so not necessarily changed by this one)
            assert new[:, engine.runner.null_block].abs().sum() > 0
        else:  # DeltaNet states [slots, ...]
            changed = {int(s) for s in (old != new).flatten(1).any(-1).nonzero().flatten()}
            assert changed <= slots and new[engine.runner.pad_slot].abs().sum() > 0
    while engine.has_unfinished():
        engine.step()


def _eager_vs_graphs(model, specs, *, max_num_seqs: int) -> None:
    eager_engine = _engine(model, device="cuda", dtype="bfloat16", max_num_seqs=max_num_seqs, enforce_eager=True)
    eager = _run(eager_engine, specs)
    assert eager_engine.runner.decode_graphs.num_steps > 0 and not eager_engine.runner.decode_graphs.graphs
    del eager_engine
    graph_engine = _engine(model, device="cuda", dtype="bfloat16", max_num_seqs=max_num_seqs, enforce_eager=False)
    graphs = graph_engine.runner.decode_graphs
    assert set(graphs.graphs) == set(graph_buckets(max_num_seqs))
    assert _run(graph_engine, specs) == eager
    assert graphs.num_replays > 0


@pytest.mark.gpu
def test_gpu_eager_and_graph_decode_give_identical_tokens_tiny() -> None:
    config = text_config(geometry_config("tiny"))
    model = build_random_model(config, quant="nvfp4", device="cuda", dtype=torch.bfloat16, seed=2)
    _eager_vs_graphs(model, _tiny_specs(config.vocab_size, [3, 17, 40, 64, 101], [8, 12, 12, 16, 20]), max_num_seqs=8)


@pytest.mark.gpu
def test_gpu_eager_and_graph_decode_give_identical_tokens_27b_slice() -> None:
    config = text_config(geometry_config("27b-4l"))
    model = build_random_model(config, quant="nvfp4", device="cuda", dtype=torch.bfloat16, seed=3)
    _eager_vs_graphs(model, _tiny_specs(config.vocab_size, [5, 33, 70, 129, 18], [6, 10, 10, 14, 14]), max_num_seqs=8)


def _fresh_then_decode(lens: list[int], device: str) -> tuple[ForwardBatch, ForwardBatch]:
    """A prefill batch of fresh sequences, then one decode step of the same sequences (16-token blocks)."""
    bs, per_seq = 16, 8
    gen = torch.Generator().manual_seed(4)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(len(lens))]

    def batch(starts: list[int], ends: list[int]) -> ForwardBatch:
        ids = torch.randint(0, 256, (sum(e - s for s, e in zip(starts, ends, strict=True)),), generator=gen)
        pos = [p for s, e in zip(starts, ends, strict=True) for p in range(s, e)]
        slots = [
            tables[i][p // bs] * bs + p % bs
            for i, (s, e) in enumerate(zip(starts, ends, strict=True))
            for p in range(s, e)
        ]
        cu = [0]
        for s, e in zip(starts, ends, strict=True):
            cu.append(cu[-1] + e - s)
        queries = tuple(e - s for s, e in zip(starts, ends, strict=True))

        def dev(values, dtype):
            return torch.tensor(values, dtype=dtype, device=device)

        return ForwardBatch(
            input_ids=ids.to(device),
            positions=dev([pos] * 3, torch.int64),
            cu_seqlens=dev(cu, torch.int32),
            context_lens=dev(starts, torch.int32),
            seq_lens=dev(ends, torch.int32),
            slot_mapping=dev(slots, torch.int64),
            block_tables=dev(tables, torch.int32),
            state_indices=dev(list(range(len(lens))), torch.int64),
            has_initial_state=dev([s > 0 for s in starts], torch.bool),
            logits_indices=dev([c - 1 for c in cu[1:]], torch.int64),
            query_lens=queries,
            context_lens_host=tuple(starts),
            max_query_len=max(queries),
            max_seq_len=max(ends),
        )

    zeros = [0] * len(lens)
    return batch(zeros, lens), batch(lens, [n + 1 for n in lens])


@pytest.mark.gpu
def test_gpu_kernel_path_matches_the_cpu_reference_path() -> None:
    config = text_config(geometry_config("tiny", vocab_size=256))
    cpu = build_random_model(config, quant="nvfp4", device="cpu", dtype=torch.float32, seed=5)
    gpu = meta_model(config, quant="nvfp4", dtype=torch.bfloat16).to_empty(device="cuda")
    gpu.load_state_dict(cpu.state_dict())
    gpu.eval()
    prefill, decode = _fresh_then_decode([5, 37, 1], "cpu")
    results = []
    for model, device in ((cpu, "cpu"), (gpu, "cuda")):
        cache = model.allocate_cache(32, 16, 4, device, model.dtype)
        with torch.inference_mode():
            moved = [
                ForwardBatch(**{f: _to(getattr(b, f), device) for f in ForwardBatch.__slots__})
                for b in (prefill, decode)
            ]
            results.append([model(b, cache).double().cpu() for b in moved])
    for ref, out in zip(results[0], results[1], strict=True):
        assert float((out - ref).norm() / ref.norm()) < 5e-2


def _to(value, device: str):
    return value.to(device) if isinstance(value, torch.Tensor) else value

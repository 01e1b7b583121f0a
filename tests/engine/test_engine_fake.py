"""The engine end to end on the fake model: batching invariance under chunking and preemption, and a random soak."""

from __future__ import annotations

import random

import pytest
import torch
from engine_fakes import FakeConfig, FakeModel, greedy, next_token

from fp4serve.config import EngineConfig
from fp4serve.engine.engine import Engine, RequestOutputDelta
from fp4serve.sampling import SamplingParams


def fake_engine(
    *,
    num_blocks: int,
    block_size: int = 4,
    max_num_seqs: int = 8,
    budget: int = 16,
    max_model_len: int | str | None = 128,
    vocab_size: int = 64,
) -> Engine:
    model = FakeModel(FakeConfig(vocab_size=vocab_size, max_position_embeddings=256))
    state = model.state_bytes_per_slot(torch.float32) * (max_num_seqs + 1)
    kv = num_blocks * block_size * model.kv_bytes_per_token(torch.float32)
    config = EngineConfig.create(
        device="cpu",
        dtype="float32",
        block_size=block_size,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget,
        kv_cache_memory_bytes=state + kv,
        max_model_len=max_model_len,
    )
    return Engine(model, config, eos_token_ids=(0,))


def reference(prompt: list[int], params: SamplingParams, vocab_size: int, max_model_len: int) -> list[int]:
    """What one request alone must produce: greedy tokens until eos, max_tokens or the model length."""
    history, out = list(prompt), []
    while True:
        token = next_token(history, vocab_size)
        history.append(token)
        out.append(token)
        if token == 0 or len(out) == params.max_tokens or len(history) >= max_model_len:
            return out


class Collector:
    def __init__(self) -> None:
        self.tokens: dict[str, list[int]] = {}
        self.finish: dict[str, str] = {}

    def add(self, deltas: list[RequestOutputDelta]) -> None:
        for d in deltas:
            assert d.request_id not in self.finish, f"delta after the end of {d.request_id}"
            self.tokens.setdefault(d.request_id, []).extend(d.new_token_ids)
            assert d.num_output_tokens == len(self.tokens[d.request_id])
            if d.finish_reason is not None:
                self.finish[d.request_id] = d.finish_reason


def test_staggered_chunked_preempted_requests_match_running_alone():
    engine = fake_engine(num_blocks=40, budget=16)
    rng = random.Random(1)
    specs = []
    for k in range(16):
        prompt = [rng.randrange(1, 64) for _ in range(rng.choice([1, 3, 9, 17, 33, 50]))]
        specs.append((f"r{k}", prompt, greedy(max_tokens=rng.randint(1, 30), ignore_eos=k % 3 == 0)))
    got = Collector()
    step = 0
    while step < 2 * len(specs) or engine.has_unfinished():
        if step % 2 == 0 and step // 2 < len(specs):
            engine.add_request(*specs[step // 2])
        got.add(engine.step())
        step += 1
    for rid, prompt, params in specs:
        expected = reference(prompt, params, 64, engine.max_model_len) if not params.ignore_eos else None
        if expected is None:
            history = list(prompt)
            for _ in range(params.max_tokens):
                history.append(next_token(history, 64))
            expected = history[len(prompt) :]
        assert got.tokens[rid] == expected, rid
        assert got.finish[rid] == ("stop" if expected[-1] == 0 and not params.ignore_eos else "length")
    stats = engine.stats()
    assert stats.num_preemptions > 0, "the cache was meant to be small enough to force preemption"
    assert stats.used_kv_blocks == 0 and stats.used_state_slots == 0


def test_thousand_random_requests_with_aborts_lose_nothing_and_free_everything():
    engine = fake_engine(num_blocks=48, max_num_seqs=12, budget=24, max_model_len=64)
    rng = random.Random(0)
    specs: dict[str, tuple[list[int], greedy]] = {}
    got = Collector()
    aborted: set[str] = set()
    live: list[str] = []
    submitted = 0
    while submitted < 1000 or engine.has_unfinished():
        for _ in range(rng.choice([0, 0, 1, 1, 2, 4]) if submitted < 1000 else 0):
            rid = f"q{submitted}"
            prompt = [rng.randrange(64) for _ in range(rng.randint(1, 40))]
            params = greedy(max_tokens=rng.randint(1, 24), ignore_eos=rng.random() < 0.3)
            specs[rid] = (prompt, params)
            engine.add_request(rid, prompt, params)
            live.append(rid)
            submitted += 1
        if live and rng.random() < 0.15:
            rid = live.pop(rng.randrange(len(live)))
            if engine.abort(rid):
                aborted.add(rid)
            else:
                assert rid in got.finish
        got.add(engine.step())
        live = [r for r in live if r not in got.finish]
    assert set(got.finish) == set(specs), "every request ends exactly once"
    assert {r for r, f in got.finish.items() if f == "abort"} == aborted
    assert 50 < len(aborted) < 500
    for rid, (prompt, _) in specs.items():
        if rid in aborted:
            continue
        history = list(prompt)
        for _ in range(len(got.tokens[rid])):
            history.append(next_token(history, 64))
        assert got.tokens[rid] == history[len(prompt) :], rid
        assert got.finish[rid] in ("stop", "length")
    stats = engine.stats()
    assert stats.used_kv_blocks == 0 and stats.used_state_slots == 0
    assert stats.num_running == stats.num_waiting == 0 and stats.num_preemptions > 0


def test_add_request_rejects_bad_input():
    engine = fake_engine(num_blocks=40)
    engine.add_request("a", [1, 2], greedy())
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("a", [1], greedy())
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("b", [], greedy())
    with pytest.raises(ValueError, match="maximum context length is 128"):
        engine.add_request("b", [1] * 129, greedy())
    with pytest.raises(ValueError, match="out of vocabulary"):
        engine.add_request("b", [1, 64], greedy())
    with pytest.raises(ValueError, match="out-of-vocab"):
        engine.add_request("b", [1], greedy(logit_bias={99: 1.0}))


def test_prompt_of_max_model_len_gives_one_token_and_abort_reports_once():
    engine = fake_engine(num_blocks=40)
    engine.add_request("full", [1] * 128, greedy(max_tokens=None, ignore_eos=True))
    engine.add_request("gone", [1, 2, 3], greedy())
    assert engine.abort("gone") and not engine.abort("gone")
    got = Collector()
    while engine.has_unfinished():
        got.add(engine.step())
    assert got.finish == {"full": "length", "gone": "abort"}
    assert len(got.tokens["full"]) == 1 and got.tokens["gone"] == []

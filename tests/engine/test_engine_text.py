"""Engine text output with the real tokenizer: streamed text equals the decode, stop strings end requests."""

from __future__ import annotations

import pytest
from engine_fakes import FakeModel, greedy, next_token

from fp4serve.config import EngineConfig
from fp4serve.engine.engine import Engine
from fp4serve.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(shared_dir):
    return Tokenizer.from_dir(shared_dir / "fixtures" / "austen-qwen35-demo")


def text_engine(tokenizer: Tokenizer) -> Engine:
    # fake-model tokens 0..63 are single printable characters of the real vocabulary ('!' .. '`')
    config = EngineConfig.create(
        device="cpu", max_num_seqs=4, max_num_batched_tokens=8, kv_cache_memory_bytes="64KiB", max_model_len=128
    )
    return Engine(FakeModel(), config, eos_token_ids=(0,), tokenizer=tokenizer)


def run(engine: Engine, requests: dict[str, tuple[list[int], object]]) -> dict[str, dict]:
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    out: dict[str, dict] = {rid: {"ids": [], "text": ""} for rid in requests}
    while engine.has_unfinished():
        for d in engine.step():
            out[d.request_id]["ids"] += d.new_token_ids
            out[d.request_id]["text"] += d.text
            if d.finish_reason:
                out[d.request_id].update(finish=d.finish_reason, stop_reason=d.stop_reason)
    return out


def reference(prompt: list[int], n: int) -> list[int]:
    history = list(prompt)
    for _ in range(n):
        history.append(next_token(history, 64))
    return history[len(prompt) :]


def test_streamed_text_equals_decode_and_stop_strings_cut_it(tokenizer):
    prompt = [5, 17, 33]
    ref = reference(prompt, 40)
    full = tokenizer.decode(ref)
    assert len(full) == 40
    stop = full[12:15]
    cut = full.find(stop)
    engine = text_engine(tokenizer)
    out = run(
        engine,
        {
            "plain": (prompt, greedy(max_tokens=40, ignore_eos=True)),
            "stop": (prompt, greedy(max_tokens=40, ignore_eos=True, stop=["no such text", stop])),
            "incl": (prompt, greedy(max_tokens=40, ignore_eos=True, stop=[stop], include_stop_str_in_output=True)),
        },
    )
    assert out["plain"]["text"] == full and out["plain"]["ids"] == ref and out["plain"]["finish"] == "length"
    # one character per token, so the request ends on the token that completes the stop string
    assert out["stop"]["ids"] == ref[: cut + len(stop)]
    assert out["stop"]["text"] == full[:cut]
    assert (out["stop"]["finish"], out["stop"]["stop_reason"]) == ("stop", stop)
    assert out["incl"]["text"] == full[: cut + len(stop)] and out["incl"]["ids"] == ref[: cut + len(stop)]
    stats = engine.stats()
    assert stats.used_kv_blocks == 0 and stats.used_state_slots == 0


def test_stop_token_text_is_left_out(tokenizer):
    prompt = [9, 9, 9]
    ref = reference(prompt, 30)
    stop_id = ref[7]
    first = ref.index(stop_id)
    out = run(text_engine(tokenizer), {"r": (prompt, greedy(max_tokens=30, ignore_eos=True, stop_token_ids=[stop_id]))})
    assert out["r"]["ids"] == ref[: first + 1]
    assert out["r"]["text"] == tokenizer.decode(ref[:first])
    assert (out["r"]["finish"], out["r"]["stop_reason"]) == ("stop", stop_id)


def test_logprobs_are_reported_per_token(tokenizer):
    out_deltas = []
    engine = text_engine(tokenizer)
    engine.add_request("r", [1, 2, 3], greedy(max_tokens=3, ignore_eos=True, logprobs=2))
    while engine.has_unfinished():
        out_deltas += engine.step()
    entries = [d.new_logprobs[0] for d in out_deltas]
    assert [e.token_id for e in entries] == reference([1, 2, 3], 3)
    for e in entries:
        assert e.rank == 1 and e.top_token_ids[0] == e.token_id and len(e.top_logprobs) == 2
        # the fake's logits are 20 on one token, 0 on the other 63
        assert e.logprob == pytest.approx(0.0, abs=1e-6) and e.top_logprobs[1] == pytest.approx(-20.0, abs=1e-4)

"""`LLM.generate` on the trained demo fixture: greedy equals a naive full-recompute loop, prompt forms, n > 1 with
seeds, stop strings, generation_config defaults, and input errors that leave the engine clean."""

from __future__ import annotations

import json

import pytest
import torch

from fp4serve import LLM, SamplingParams
from fp4serve.engine.batch import ForwardBatch

PROMPTS = ["It is a truth universally acknowledged", "Anne Elliot walked", "The"]


@pytest.fixture(scope="module")
def demo_dir(shared_dir):
    return shared_dir / "fixtures" / "austen-qwen35-demo"


@pytest.fixture(scope="module")
def one_thread():
    # tiny ops: one thread avoids OpenMP hand-offs that cost more than the work on a shared 2-core machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def llm(demo_dir, one_thread):
    return LLM(
        demo_dir,
        device="cpu",
        max_num_seqs=4,
        max_num_batched_tokens=32,
        kv_cache_memory_bytes="16MiB",
        max_model_len=256,
    )


def naive_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by recomputing the whole sequence from empty caches for every token."""
    ids = list(prompt)
    for _ in range(n):
        L = len(ids)
        blocks = -(-L // 16)
        cache = model.allocate_cache(blocks, 16, 1, "cpu", torch.float32)
        batch = ForwardBatch(
            input_ids=torch.tensor(ids),
            positions=torch.arange(L).expand(3, L),
            cu_seqlens=torch.tensor([0, L], dtype=torch.int32),
            context_lens=torch.tensor([0], dtype=torch.int32),
            seq_lens=torch.tensor([L], dtype=torch.int32),
            slot_mapping=torch.arange(L),
            block_tables=torch.arange(blocks, dtype=torch.int32)[None],
            state_indices=torch.tensor([0]),
            has_initial_state=torch.tensor([False]),
            logits_indices=torch.tensor([L - 1]),
            query_lens=(L,),
            context_lens_host=(0,),
            max_query_len=L,
            max_seq_len=L,
        )
        with torch.inference_mode():
            hidden = model.forward(batch, cache)
            ids.append(int(model.compute_logits(hidden[batch.logits_indices]).argmax(-1)))
    return ids[len(prompt) :]


def test_greedy_matches_a_naive_loop_and_text_matches_tokens(llm):
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))
    assert [o.prompt for o in outs] == PROMPTS
    for out in outs:
        assert out.prompt_token_ids == llm.tokenizer.encode(out.prompt)
        assert out.token_ids == naive_greedy(llm.engine.model, out.prompt_token_ids, 10)
        assert out.text == llm.tokenizer.decode(out.token_ids) and out.finish_reason == "length"


def test_prompt_forms(llm):
    greedy = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    ids = llm.tokenizer.encode(PROMPTS[1])
    (from_text,) = llm.generate(PROMPTS[1], greedy)
    (from_ids,) = llm.generate(ids, greedy)
    from_dicts = llm.generate([{"prompt_token_ids": ids}, {"prompt": PROMPTS[1]}, tuple(ids)], greedy)
    assert from_ids.prompt is None and from_ids.prompt_token_ids == ids
    assert {o.text for o in [from_text, from_ids, *from_dicts]} == {from_text.text}
    assert llm.generate([], greedy) == []


def test_n_choices_per_params_and_seeds(llm):
    sampled = SamplingParams(temperature=1.0, n=3, seed=7, max_tokens=8, ignore_eos=True)
    first = llm.generate(PROMPTS[:2], [sampled, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)])
    again = llm.generate(PROMPTS[0], sampled)
    assert len(first[0].outputs) == 3 and [o.index for o in first[0].outputs] == [0, 1, 2]
    assert len(first[1].outputs) == 1 and len(first[1].token_ids) == 3
    # seeded: the same choices again, whatever else shared the batch; choices differ from each other
    assert [o.token_ids for o in first[0].outputs] == [o.token_ids for o in again[0].outputs]
    assert len({tuple(o.token_ids) for o in first[0].outputs}) > 1


def test_stop_strings_and_eos(llm):
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    (full,) = llm.generate(PROMPTS[0], greedy)
    stop = full.text[5:9]
    (cut,) = llm.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop=[stop]))
    assert cut.text == full.text[: full.text.find(stop)]
    assert (cut.finish_reason, cut.outputs[0].stop_reason) == ("stop", stop)
    assert cut.token_ids == full.token_ids[: len(cut.token_ids)]
    eos = full.token_ids[3]
    (stopped,) = llm.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[eos]))
    assert stopped.token_ids == full.token_ids[: full.token_ids.index(eos) + 1]


def test_bad_input_raises_and_leaves_nothing_behind(llm):
    with pytest.raises(ValueError, match="maximum context length is 256"):
        llm.generate(["fine", [1] * 300], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
        llm.generate("x", [SamplingParams(), SamplingParams()])
    with pytest.raises(ValueError, match="not a directory"):
        LLM("/nonexistent/model")
    stats = llm.stats()
    assert stats.num_running == stats.num_waiting == stats.used_kv_blocks == stats.used_state_slots == 0


def test_generation_config_defaults_apply(demo_dir, tmp_path, one_thread):
    for item in demo_dir.iterdir():
        if item.name != "generation_config.json":
            (tmp_path / item.name).symlink_to(item)
    config = json.loads((demo_dir / "generation_config.json").read_text())
    (tmp_path / "generation_config.json").write_text(json.dumps({**config, "temperature": 0.0, "max_new_tokens": 5}))
    llm = LLM(tmp_path, device="cpu", max_num_seqs=2, kv_cache_memory_bytes="8MiB", max_model_len=128)
    (out,) = llm.generate(PROMPTS[0])
    (greedy,) = llm.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=5))
    assert out.token_ids == greedy.token_ids and len(out.token_ids) <= 5

"""Our Qwen3.5 text model, loaded through our loader from a transformers `save_pretrained` directory, against
transformers itself (float32, tiny random configs, both checkpoint layouts): one-shot prefill longer than a DeltaNet
chunk, prefill + 20 decode steps, a mixed batch with a chunked prefill, and greedy generation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from qwen35_harness import VOCAB, Pager, build_hf_model, hf_logits, rel_err, save_and_load

TOL = 1e-4
LAYOUTS = ["causal", "conditional"]


@pytest.fixture(scope="module", params=LAYOUTS)
def models(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    hf = build_hf_model(request.param, seed=0)
    ours = save_and_load(hf, tmp_path_factory.mktemp(request.param))
    return hf, ours


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_one_shot_prefill_longer_than_a_chunk(models) -> None:
    hf, ours = models
    ids = prompt(150, seed=10)
    pager = Pager(ours, num_seqs=1, max_len=150)
    logits = pager.logits(ours, pager.batch([(0, ids, 0)], all_logits=True))
    err = rel_err(logits, hf_logits(hf, ids))
    print(f"prefill 150 tokens: rel err {err:.2e}")
    assert err < TOL


def test_prefill_then_20_decode_steps(models) -> None:
    hf, ours = models
    ids = prompt(90, seed=11)
    ref = hf_logits(hf, ids)  # row t = logits after token t
    pager = Pager(ours, num_seqs=1, max_len=90)
    errs = [rel_err(pager.logits(ours, pager.batch([(0, ids[:70], 0)])), ref[69:70])]
    for t in range(70, 90):
        errs.append(rel_err(pager.logits(ours, pager.batch([(0, [ids[t]], t)])), ref[t : t + 1]))
    print(f"prefill + 20 decode steps: max rel err {max(errs):.2e}")
    assert max(errs) < TOL


def test_mixed_batch_with_chunked_prefill(models) -> None:
    """Step 1: four prompts of different lengths (one only partly: its first 50 of 130 tokens). Step 2: the rest of
    that prompt (80 tokens after 50 cached) together with one decode token for each other sequence."""
    hf, ours = models
    lens = [1, 37, 130, 65]
    prompts = [prompt(n + 1, seed=20 + i) for i, n in enumerate(lens)]  # one extra token each for the decode step
    refs = [hf_logits(hf, p) for p in prompts]
    pager = Pager(ours, num_seqs=4, max_len=140)
    step1 = [(0, prompts[0][:1], 0), (1, prompts[1][:37], 0), (2, prompts[2][:50], 0), (3, prompts[3][:65], 0)]
    first = pager.logits(ours, pager.batch(step1, all_logits=True))
    cu = [0, 1, 38, 88, 153]
    errs = [rel_err(first[cu[i] : cu[i + 1]], refs[i][: step1[i][2] + len(step1[i][1])]) for i in range(4)]
    step2 = [
        (0, prompts[0][1:2], 1),
        (1, prompts[1][37:38], 37),
        (2, prompts[2][50:130], 50),
        (3, prompts[3][65:66], 65),
    ]
    second = pager.logits(ours, pager.batch(step2, all_logits=True))
    cu = [0, 1, 2, 82, 83]
    errs += [
        rel_err(second[cu[i] : cu[i + 1]], refs[i][step2[i][2] : step2[i][2] + len(step2[i][1])]) for i in range(4)
    ]
    print(f"mixed batch + chunked prefill: max rel err {max(errs):.2e}")
    assert max(errs) < TOL


def test_greedy_generation_matches_transformers(models) -> None:
    hf, ours = models
    ids = prompt(20, seed=30)
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, min_new_tokens=32)
    expected = out[0, len(ids) :].tolist()
    pager = Pager(ours, num_seqs=1, max_len=60)
    generated: list[int] = []
    logits = pager.logits(ours, pager.batch([(0, ids, 0)]))
    while len(generated) < 32:
        generated.append(int(logits[0].argmax()))
        logits = pager.logits(ours, pager.batch([(0, generated[-1:], len(ids) + len(generated) - 1)]))
    assert generated == expected
    assert len(set(expected)) > 3  # a non-degenerate sequence


def test_tied_embeddings(tmp_path: Path) -> None:
    hf = build_hf_model("causal", seed=3, tie_word_embeddings=True)
    ours = save_and_load(hf, tmp_path)
    assert ours.lm_head is None
    ids = prompt(70, seed=40)
    pager = Pager(ours, num_seqs=1, max_len=70)
    logits = pager.logits(ours, pager.batch([(0, ids, 0)], all_logits=True))
    assert rel_err(logits, hf_logits(hf, ids)) < TOL


def test_one_token_prompts_in_a_decode_shaped_batch(models) -> None:
    """A step where every sequence has one token but two of them are fresh prompts (no history, garbage in their
    state slots) takes the decode path and must start those two from zero state."""
    hf, ours = models
    prompts = [prompt(3, seed=50), prompt(3, seed=51), prompt(12, seed=52)]
    refs = [hf_logits(hf, p) for p in prompts]
    pager = Pager(ours, num_seqs=3, max_len=16)
    pager.logits(ours, pager.batch([(2, prompts[2][:10], 0)]))
    errs = []
    for t in range(2):
        steps = [(0, prompts[0][t : t + 1], t), (1, prompts[1][t : t + 1], t), (2, prompts[2][10 + t : 11 + t], 10 + t)]
        batch = pager.batch(steps)
        assert batch.is_decode_only
        got = pager.logits(ours, batch)
        errs += [rel_err(got[0], refs[0][t]), rel_err(got[1], refs[1][t]), rel_err(got[2], refs[2][10 + t])]
    assert max(errs) < TOL

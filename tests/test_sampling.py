"""Sampling: parameter validation and defaults, the batched sampler's masks, penalties, seeds and logprobs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fp4serve.sampling import GenerationDefaults, Sampler, SamplingParams, make_generator

EOS = 7


def _logits_from_probs(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs).log()


def _support(sampler: Sampler, logits: torch.Tensor, params: SamplingParams, draws: int = 3000) -> set[int]:
    """The set of tokens drawn from `draws` copies of one row."""
    batch = logits.unsqueeze(0).expand(draws, -1).contiguous()
    torch.manual_seed(0)
    out = sampler.sample(batch, [params] * draws, [[]] * draws, [[]] * draws)
    return set(out.token_ids.tolist())


# validation


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"n": 0}, "n must be at least 1, got 0."),
        ({"temperature": -0.5}, "temperature must be non-negative, got -0.5."),
        ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0."),
        ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5."),
        ({"top_k": -2}, "top_k must be 0 (disable), or at least 1, got -2."),
        ({"top_k": 1.5}, "top_k must be an integer, got float"),
        ({"min_p": 1.5}, "min_p must be in [0, 1], got 1.5."),
        ({"min_p": -0.1}, "min_p must be in [0, 1], got -0.1."),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be greater than zero, got 0.0."),
        ({"presence_penalty": 2.5}, "presence_penalty must be in [-2, 2], got 2.5."),
        ({"frequency_penalty": -3.0}, "frequency_penalty must be in [-2, 2], got -3.0."),
        ({"max_tokens": 0}, "max_tokens must be at least 1, got 0."),
        ({"min_tokens": -1}, "min_tokens must be greater than or equal to 0, got -1."),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens must be less than or equal to max_tokens=4, got 5."),
        ({"logprobs": 21}, "Requested sample logprobs of 21, which is greater than max allowed: 20"),
        ({"logprobs": -1}, "logprobs must be non-negative, got -1."),
        ({"stop": ["a", ""]}, "stop cannot contain an empty string."),
        ({"stop_token_ids": [1, "x"]}, "stop_token_ids must contain only integers, got [1, 'x']."),
        ({"allowed_token_ids": []}, "allowed_token_ids is not None and empty!"),
    ],
)
def test_validation_messages(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as exc:
        SamplingParams(**kwargs)
    assert str(exc.value) == message


def test_validation_accepts_edges_and_checks_vocab() -> None:
    SamplingParams(temperature=0.0, top_p=1.0, top_k=-1, min_p=1.0, logprobs=20, max_tokens=1, min_tokens=1)
    params = SamplingParams(logit_bias={"5": 1.0, 12: -2.0}, allowed_token_ids=[1, 2])
    assert params.logit_bias == ((5, 1.0), (12, -2.0))
    with pytest.raises(ValueError, match=r"token_id\(s\) \[12\] in logit_bias contain out-of-vocab token ids"):
        params.validate(vocab_size=10)
    with pytest.raises(ValueError, match="max allowed: 5"):
        SamplingParams(logprobs=6).validate(max_logprobs=5)
    assert SamplingParams(stop="END").stop == ("END",)


# defaults


def test_with_defaults_prefers_request_then_generation_config_then_fallbacks() -> None:
    config = {"temperature": 0.6, "top_k": 20, "top_p": 0.95, "max_new_tokens": 64, "do_sample": True}
    resolved = SamplingParams(temperature=0.0, min_p=0.1).with_defaults(config)
    assert (resolved.temperature, resolved.top_k, resolved.top_p, resolved.min_p) == (0.0, 20, 0.95, 0.1)
    assert resolved.repetition_penalty == 1.0 and resolved.max_tokens == 64
    fallback = SamplingParams(max_tokens=5).with_defaults(None)
    assert (fallback.temperature, fallback.top_p, fallback.top_k, fallback.min_p) == (1.0, 1.0, 0, 0.0)
    assert fallback.repetition_penalty == 1.0 and fallback.max_tokens == 5
    assert not fallback.is_greedy and SamplingParams(temperature=0).is_greedy


def test_generation_defaults_from_dir(tmp_path: Path, shared_dir: Path) -> None:
    assert GenerationDefaults.from_dir(tmp_path) == GenerationDefaults()
    config = {"do_sample": True, "temperature": 1.0, "top_k": 20, "top_p": 0.95, "eos_token_id": [248046, 248044]}
    (tmp_path / "generation_config.json").write_text(json.dumps(config))
    defaults = GenerationDefaults.from_dir(tmp_path)
    assert defaults.eos_token_ids == (248046, 248044)
    assert defaults.as_dict() == {"temperature": 1.0, "top_k": 20, "top_p": 0.95}
    assert SamplingParams().with_defaults(defaults).top_k == 20
    fixture = GenerationDefaults.from_dir(shared_dir / "fixtures" / "austen-qwen35-tiny")
    assert fixture.eos_token_ids == (248046,) and fixture.as_dict() == {}
    (tmp_path / "generation_config.json").write_text("{")
    with pytest.raises(ValueError, match="generation_config.json is not valid JSON"):
        GenerationDefaults.from_dir(tmp_path)


def test_for_choice_offsets_seed() -> None:
    params = SamplingParams(n=3, seed=10)
    assert [params.for_choice(i).seed for i in range(3)] == [10, 11, 12]
    assert params.for_choice(2).n == 1 and SamplingParams(n=2).for_choice(1).seed is None


# the sampler


def test_greedy_is_argmax_and_top_k_one_is_greedy() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    sampler = Sampler()
    empty = [[]] * 6
    greedy = sampler.sample(logits, [SamplingParams(temperature=0.0)] * 6, empty, empty)
    assert torch.equal(greedy.token_ids, logits.argmax(-1))
    top1 = sampler.sample(logits, [SamplingParams(temperature=1.3, top_k=1)] * 6, empty, empty)
    assert torch.equal(top1.token_ids, logits.argmax(-1))
    # bf16 logits are sampled in float32 and the caller's tensor is left alone
    before = logits.clone()
    sampler.sample(logits.bfloat16(), [SamplingParams(temperature=1.0, repetition_penalty=2.0)] * 6, empty, empty)
    assert torch.equal(logits, before)


def test_seeded_sampling_is_reproducible_and_batch_independent() -> None:
    torch.manual_seed(1)
    steps = [torch.randn(5, 300) for _ in range(8)]
    sampler = Sampler()
    target = SamplingParams(temperature=1.0, top_p=0.9, seed=1234)

    def run(row: int, batch: int, others: list[SamplingParams]) -> list[int]:
        generators = [make_generator(1234) if i == row else None for i in range(batch)]
        for i, p in enumerate(others):
            if p.seed is not None and i != row:
                generators[i] = make_generator(p.seed)
        params = [target if i == row else others[i] for i in range(batch)]
        tokens = []
        for logits in steps:
            rows = logits[:batch].clone()
            rows[row] = logits[0]
            out = sampler.sample(rows, params, [[]] * batch, [[]] * batch, generators)
            tokens.append(int(out.token_ids[row]))
        return tokens

    alone = run(0, 1, [target])
    others = [
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, seed=99),
        SamplingParams(temperature=1.0, top_k=5),
        target,
    ]
    assert run(2, 5, others) == alone
    assert run(4, 5, others) == alone
    assert run(0, 1, [target]) == alone
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, seed=4321)
    generator = make_generator(4321)
    different = [int(sampler.sample(s[:1], [other_seed], [[]], [[]], [generator]).token_ids[0]) for s in steps]
    assert different != alone


def test_sampling_follows_the_distribution() -> None:
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    draws = 40000
    logits = probs.log().unsqueeze(0).expand(draws, -1).contiguous()
    torch.manual_seed(3)
    params = [SamplingParams(temperature=1.0)] * draws
    counts = torch.bincount(Sampler().sample(logits, params, [[]] * draws, [[]] * draws).token_ids, minlength=4)
    assert torch.allclose(counts / draws, probs, atol=0.01)
    # temperature 2 flattens: p^(1/2), renormalised
    hot = probs.sqrt() / probs.sqrt().sum()
    params = [SamplingParams(temperature=2.0)] * draws
    counts = torch.bincount(Sampler().sample(logits, params, [[]] * draws, [[]] * draws).token_ids, minlength=4)
    assert torch.allclose(counts / draws, hot, atol=0.01)


PROBS = [0.35, 0.25, 0.2, 0.1, 0.06, 0.04]


@pytest.mark.parametrize(
    "kwargs,kept",
    [
        ({}, {0, 1, 2, 3, 4, 5}),
        ({"top_k": 2}, {0, 1}),
        ({"top_k": 0}, {0, 1, 2, 3, 4, 5}),
        ({"top_k": -1}, {0, 1, 2, 3, 4, 5}),
        ({"top_k": 100}, {0, 1, 2, 3, 4, 5}),
        ({"top_p": 0.7}, {0, 1, 2}),
        ({"top_p": 0.3}, {0}),
        ({"top_p": 0.85}, {0, 1, 2, 3}),
        ({"min_p": 0.5}, {0, 1, 2}),
        ({"min_p": 0.2}, {0, 1, 2, 3}),
        # top-p sees the renormalised survivors of top-k / min_p: 0.889 of the mass lies before token 3
        ({"top_k": 4, "top_p": 0.85}, {0, 1, 2}),
        ({"min_p": 0.2, "top_p": 0.8}, {0, 1, 2}),
        ({"temperature": 0.5, "min_p": 0.5}, {0, 1}),  # p^2 renormalised: 0.1225 0.0625 0.04 ...
    ],
)
def test_masks_keep_exactly_the_right_tokens(kwargs: dict, kept: set[int]) -> None:
    params = SamplingParams(**{"temperature": 1.0, **kwargs})
    assert _support(Sampler(), _logits_from_probs(PROBS), params) == kept


def test_masks_per_row_in_one_batch_and_top_k_ties() -> None:
    logits = _logits_from_probs(PROBS).unsqueeze(0).repeat(3000, 1)
    cases = [({"top_k": 2}, {0, 1}), ({"top_p": 0.7}, {0, 1, 2}), ({"min_p": 0.5}, {0, 1, 2}), ({}, set(range(6)))]
    params = [SamplingParams(temperature=1.0, **cases[i % 4][0]) for i in range(3000)]
    torch.manual_seed(0)
    tokens = Sampler().sample(logits, params, [[]] * 3000, [[]] * 3000).token_ids.tolist()
    for case in range(4):
        assert set(tokens[case::4]) == cases[case][1]
    # logits tied at the k-th value are all kept
    tied = torch.tensor([2.0, 1.0, 1.0, 0.0])
    assert _support(Sampler(), tied, SamplingParams(temperature=1.0, top_k=2)) == {0, 1, 2}


def test_top_k_head_path_draws_what_the_full_path_draws() -> None:
    from fp4serve.sampling.sampler import _sample_random

    torch.manual_seed(4)
    rows = 64
    x = (torch.randn(rows, 500) * 2).bfloat16().float()  # bf16 values make ties at the k-th logit common
    top_k = [[20, 5, 50, 1, 499, 2][i % 6] for i in range(rows)]
    top_p = [[0.95, 0.5, 0.99, 0.9, 0.3, 1.0, 0.7][i % 7] for i in range(rows)]
    min_p = [[0.0, 0.05, 0.3][i % 3] for i in range(rows)]
    temperature = [[1.0, 0.6, 1.5, 0.3][i % 4] for i in range(rows)]
    for step in range(5):
        draws = [
            _sample_random(
                x, temperature, top_k, top_p, min_p, [make_generator(100 * step + i) for i in range(rows)],
                allow_head=allow_head,
            )
            for allow_head in (True, False)
        ]  # fmt: skip
        assert torch.equal(draws[0], draws[1])
        for row, k in enumerate(top_k):
            assert x[row, draws[0][row]] >= x[row].topk(k).values[-1]


def test_constraints() -> None:
    logits = _logits_from_probs(PROBS + [0.0001, 0.0001])  # ids 6, 7 (= EOS) are unlikely
    sampler = Sampler(eos_token_ids=[EOS])
    assert _support(sampler, logits, SamplingParams(temperature=1.0, allowed_token_ids=[3, 4, 99])) == {3, 4}
    biased = SamplingParams(temperature=0.0, logit_bias={5: 100.0})
    assert sampler.sample(logits[None], [biased], [[]], [[]]).token_ids.tolist() == [5]
    # bad words: a single token is always banned, a sequence bans its last token right after its prefix
    bad = SamplingParams(temperature=0.0, bad_words_token_ids=[[0], [4, 1]])
    assert sampler.sample(logits[None], [bad], [[]], [[]]).token_ids.tolist() == [1]
    assert sampler.sample(logits[None], [bad], [[]], [[3, 4]]).token_ids.tolist() == [2]
    # min_tokens bans eos and stop token ids until enough output exists
    eos_logits = logits.clone()
    eos_logits[EOS] = eos_logits[6] = 10.0
    min_tok = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[6])
    assert sampler.sample(eos_logits[None], [min_tok], [[]], [[1]]).token_ids.tolist() == [0]
    assert sampler.sample(eos_logits[None], [min_tok], [[]], [[1, 2]]).token_ids.item() in (6, EOS)
    # padded vocabulary rows are never drawn
    padded = torch.cat([logits, torch.tensor([50.0])])
    assert Sampler(vocab_size=8).sample(padded[None], [SamplingParams(temperature=0)], [[]], [[]]).token_ids.item() == 0


def _penalised_reference(logits, prompt, output, rep, presence, frequency):
    out = logits.clone()
    for token in range(len(out)):
        if token in prompt or token in output:
            out[token] = out[token] / rep if out[token] > 0 else out[token] * rep
        count = output.count(token)
        out[token] -= frequency * count + presence * (count > 0)
    return out


def test_penalties_match_the_formula() -> None:
    torch.manual_seed(5)
    logits = torch.randn(4, 12) * 3
    prompts = [[1, 2, 2, 3], [], [5, 6], [0, 11]]
    outputs = [[3, 3, 4], [7, 7, 7, 8], [], [11, 11, 2]]
    params = [
        SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25),
        SamplingParams(frequency_penalty=-0.5, presence_penalty=1.5),
        SamplingParams(repetition_penalty=0.8),
        SamplingParams(),
    ]
    processed = Sampler().process_logits(logits, params, prompts, outputs)
    for i, p in enumerate(params):
        rep = p.repetition_penalty or 1.0
        expected = _penalised_reference(logits[i], prompts[i], outputs[i], rep, p.presence_penalty, p.frequency_penalty)
        torch.testing.assert_close(processed[i], expected)
    # tensors are accepted as token histories too
    tensors = Sampler().process_logits(
        logits, params, [torch.tensor(p) for p in prompts], [torch.tensor(o) for o in outputs]
    )
    torch.testing.assert_close(tensors, processed)


def test_logprobs_are_raw_with_top_k_and_rank() -> None:
    torch.manual_seed(2)
    logits = torch.randn(3, 30)
    params = [
        SamplingParams(temperature=0.0, logprobs=3, repetition_penalty=1.5),
        SamplingParams(temperature=0.8, logprobs=0, seed=1),
        SamplingParams(temperature=1.0),
    ]
    out = Sampler().sample(logits, params, [[1], [2], [3]], [[4], [], []], [None, make_generator(1), None])
    raw = torch.log_softmax(logits, dim=-1)
    torch.testing.assert_close(out.logprobs, raw.gather(1, out.token_ids[:, None]).squeeze(1))
    assert out.top_token_ids.shape == (3, 3)
    torch.testing.assert_close(out.top_logprobs, raw.topk(3, dim=-1).values)
    assert torch.equal(out.top_token_ids, raw.topk(3, dim=-1).indices)
    for i in range(3):
        assert out.ranks[i].item() == int((raw[i] > raw[i, out.token_ids[i]]).sum()) + 1
    plain = Sampler().sample(logits, [SamplingParams(temperature=0)] * 3, [[]] * 3, [[]] * 3)
    assert plain.logprobs is None and plain.top_token_ids is None


@pytest.mark.gpu
def test_seeded_sampling_on_gpu_is_batch_independent() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 248320, device="cuda")
    params = SamplingParams(temperature=1.0, top_k=20, top_p=0.95, seed=7)
    alone = Sampler().sample(logits[:1], [params], [[]], [[]], [make_generator(7, "cuda")])
    batch = [params, SamplingParams(temperature=0.5), SamplingParams(temperature=0.0), SamplingParams(seed=3)]
    generators = [make_generator(7, "cuda"), None, None, make_generator(3, "cuda")]
    together = Sampler().sample(logits, batch, [[]] * 4, [[]] * 4, generators)
    assert together.token_ids.device.type == "cuda"
    assert together.token_ids[0].item() == alone.token_ids[0].item()
    assert together.token_ids[2].item() == logits[2].argmax().item()

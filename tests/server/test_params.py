"""Request fields → SamplingParams: generation_config defaults, vLLM fallbacks, token budget rules (no model)."""

from __future__ import annotations

import pytest

from fp4serve.server.errors import APIError
from fp4serve.server.params import sampling_params, token_budget
from fp4serve.server.protocol import ChatCompletionRequest, CompletionRequest

QWEN_DEFAULTS = {"temperature": 0.6, "top_p": 0.95, "top_k": 20}
USER = [{"role": "user", "content": "hi"}]


def params_for(request, generation_config, **kwargs):
    return sampling_params(request, max_tokens=8, logprobs=None, generation_config=generation_config, tokenizer=None,
                           vocab_size=1000, **kwargs)  # fmt: skip


def test_generation_config_fills_what_the_request_omits():
    params = params_for(ChatCompletionRequest(messages=USER), QWEN_DEFAULTS)
    assert (params.temperature, params.top_p, params.top_k) == (0.6, 0.95, 20)
    assert (params.min_p, params.repetition_penalty) == (0.0, 1.0)
    explicit = params_for(ChatCompletionRequest(messages=USER, temperature=0.0, top_k=5), QWEN_DEFAULTS)
    assert (explicit.temperature, explicit.top_p, explicit.top_k) == (0.0, 0.95, 5)
    fallback = params_for(CompletionRequest(prompt="x"), {})
    assert (fallback.temperature, fallback.top_p, fallback.top_k) == (1.0, 1.0, 0)


def test_choices_get_distinct_seeds_and_request_fields_pass_through():
    request = CompletionRequest(prompt="x", seed=11, stop="END", stop_token_ids=[5], logit_bias={"7": 2.5},
                                min_tokens=2, ignore_eos=True, presence_penalty=1.5)  # fmt: skip
    first, second = params_for(request, {}), params_for(request, {}, choice_index=1)
    assert (first.seed, second.seed) == (11, 12)
    assert first.stop == ("END",) and first.stop_token_ids == (5,) and first.logit_bias == ((7, 2.5),)
    assert (first.min_tokens, first.ignore_eos, first.presence_penalty, first.max_tokens) == (2, True, 1.5, 8)


def test_bad_sampling_values_are_400():
    with pytest.raises(APIError, match="top_p must be in") as info:
        params_for(ChatCompletionRequest(messages=USER, top_p=0.0), {})
    assert info.value.status == 400
    with pytest.raises(APIError, match="logit_bias keys must be token ids"):
        params_for(ChatCompletionRequest(messages=USER, logit_bias={"x": 1.0}), {})


@pytest.mark.parametrize(
    ("prompt", "requested", "default", "expected"),
    [(10, None, None, 90), (10, 5, None, 5), (10, None, 32, 32), (10, 90, None, 90), (99, None, None, 1)],
)
def test_token_budget(prompt, requested, default, expected):
    assert token_budget(prompt, requested, 100, default) == expected


def test_token_budget_errors():
    with pytest.raises(APIError, match="maximum context length is 100 tokens. However, you requested 91"):
        token_budget(10, 91, 100, None)
    with pytest.raises(APIError, match="max_tokens must be at least 1, got 0.") as info:
        token_budget(100, None, 100, None)
    assert info.value.param == "max_tokens"

"""/v1/completions over real HTTP on the real demo model: shapes, usage, n and several prompts, stop rules, logprobs."""

from __future__ import annotations

import json

import pytest
from conftest import post

PROMPT = "It is a truth universally acknowledged, that"


def complete(demo, **body) -> dict:
    response = post(demo, "/v1/completions", {"prompt": PROMPT, "temperature": 0, **body})
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def greedy_text(demo) -> str:
    return complete(demo, max_tokens=24, ignore_eos=True)["choices"][0]["text"]


def test_default_max_tokens_is_16_and_usage_counts_tokens(demo, client):
    prompt_ids = post(demo, "/tokenize", {"prompt": PROMPT}).json()["tokens"]
    response = client.completions.create(
        model="fp4serve-demo", prompt=PROMPT, temperature=0, extra_body={"ignore_eos": True}
    )
    assert response.id.startswith("cmpl-") and response.object == "text_completion"
    assert response.usage.prompt_tokens == len(prompt_ids)
    assert response.usage.completion_tokens == 16 and response.choices[0].finish_reason == "length"
    # the text is the detokenized continuation of exactly those 16 tokens
    again = complete(demo, prompt=prompt_ids, max_tokens=16, ignore_eos=True)
    assert again["choices"][0]["text"] == response.choices[0].text


def test_several_prompts_and_n(demo):
    body = complete(
        demo, prompt=[PROMPT, "Emma Woodhouse,"], n=2, max_tokens=4, ignore_eos=True, seed=3, temperature=0.8
    )
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    counts = [post(demo, "/tokenize", {"prompt": p}).json()["count"] for p in (PROMPT, "Emma Woodhouse,")]
    assert body["usage"]["prompt_tokens"] == sum(counts)
    assert body["usage"]["completion_tokens"] == 16


def test_streaming_joins_to_the_same_text(demo, greedy_text):
    body = {
        "prompt": PROMPT,
        "temperature": 0,
        "max_tokens": 24,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with post(demo, "/v1/completions", body, stream=True) as response:
        events = [line[6:] for line in response.iter_lines(decode_unicode=True) if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 24
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == greedy_text
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


def test_stop_string_cuts_the_text(demo, greedy_text):
    words = [w for w in greedy_text.split() if len(w) > 2]
    stop = words[len(words) // 2]
    cut = greedy_text.index(stop)
    body = complete(demo, max_tokens=24, ignore_eos=True, stop=[stop])
    choice = body["choices"][0]
    assert choice["text"] == greedy_text[:cut]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop
    kept = complete(demo, max_tokens=24, ignore_eos=True, stop=stop, include_stop_str_in_output=True)
    assert kept["choices"][0]["text"] == greedy_text[: cut + len(stop)]


def test_stop_token_id(demo):
    ids = post(demo, "/tokenize", {"prompt": PROMPT}).json()["tokens"]
    first = complete(demo, prompt=ids, max_tokens=10, ignore_eos=True, return_token_ids=True)
    assert first["choices"][0]["prompt_token_ids"] == ids
    generated = first["choices"][0]["token_ids"]
    assert len(generated) == 10
    position = next(i for i, t in enumerate(generated) if i >= 2 and t not in generated[:i])
    body = complete(demo, prompt=ids, max_tokens=10, ignore_eos=True, stop_token_ids=[generated[position]])
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == generated[position]
    # the stop token counts as generated but its text is not in the output
    assert body["usage"]["completion_tokens"] == position + 1


def test_logprobs_and_echo(demo, greedy_text):
    body = complete(demo, max_tokens=5, ignore_eos=True, logprobs=2)
    block = body["choices"][0]["logprobs"]
    assert len(block["tokens"]) == len(block["token_logprobs"]) == len(block["top_logprobs"]) == 5
    assert block["text_offset"][0] == 0 and block["text_offset"] == sorted(block["text_offset"])
    assert all(lp <= 0 for lp in block["token_logprobs"])
    assert all(1 <= len(top) <= 2 for top in block["top_logprobs"])
    echoed = complete(demo, max_tokens=5, ignore_eos=True, echo=True)
    assert echoed["choices"][0]["text"] == PROMPT + greedy_text[: len(echoed["choices"][0]["text"]) - len(PROMPT)]
    assert echoed["choices"][0]["text"].startswith(PROMPT)

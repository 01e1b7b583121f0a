"""/v1/models, /health, /version, /load, /tokenize, /detokenize and /metrics over real HTTP."""

from __future__ import annotations

import re

import requests
from conftest import post


def test_models(demo, client):
    body = requests.get(f"{demo.v1}/models", timeout=30).json()
    assert body["object"] == "list"
    (card,) = body["data"]
    assert card["id"] == "fp4serve-demo" and card["object"] == "model"
    assert card["max_model_len"] == demo.state.max_model_len
    assert card["root"] == demo.state.settings.model_root and card["parent"] is None
    assert card["permission"][0]["object"] == "model_permission"
    assert [m.id for m in client.models.list().data] == ["fp4serve-demo"]
    assert client.models.retrieve("fp4serve-demo").id == "fp4serve-demo"


def test_health_version_load(demo):
    health = requests.get(f"{demo.url}/health", timeout=30)
    assert health.status_code == 200 and health.content == b""
    assert requests.get(f"{demo.url}/ping", timeout=30).status_code == 200
    assert requests.get(f"{demo.url}/version", timeout=30).json() == {"version": "test"}
    assert requests.get(f"{demo.url}/load", timeout=30).json()["server_load"] >= 0


def test_tokenize_and_detokenize(demo):
    tokenizer = demo.state.tokenizer
    body = post(demo, "/tokenize", {"prompt": "Pride and Prejudice", "return_token_strs": True}).json()
    assert body["tokens"] == tokenizer.encode("Pride and Prejudice")
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == demo.state.max_model_len
    assert body["token_strs"] == [tokenizer.id_to_token(t) for t in body["tokens"]]
    assert post(demo, "/detokenize", {"tokens": body["tokens"]}).json() == {"prompt": "Pride and Prejudice"}
    chat = post(demo, "/tokenize", {"messages": [{"role": "user", "content": "hi"}]}).json()
    text = tokenizer.decode(chat["tokens"], skip_special_tokens=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n"
    off = post(
        demo,
        "/tokenize",
        {"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"enable_thinking": False}},
    ).json()
    assert tokenizer.decode(off["tokens"], skip_special_tokens=False).endswith("<think>\n\n</think>\n\n")
    assert chat["token_strs"] is None


def test_case_47_old_reasoning_is_dropped(demo):
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "<think>\nold\n</think>\n\nHello!"},
        {"role": "user", "content": "bye"},
    ]
    tokens = post(demo, "/tokenize", {"messages": messages}).json()["tokens"]
    text = demo.state.tokenizer.decode(tokens, skip_special_tokens=False)
    assert "<|im_start|>assistant\nHello!<|im_end|>\n" in text and "old" not in text


def _sample(text: str, name: str, **labels: str) -> float:
    pattern = re.escape(name) + r"\{([^}]*)\} (\S+)"
    for match in re.finditer(pattern, text):
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(match.group(2))
    raise AssertionError(f"no sample {name} {labels}")


def test_metrics_count_requests_and_tokens(demo):
    def scrape() -> str:
        response = requests.get(f"{demo.url}/metrics", timeout=30)
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
        return response.text

    before = scrape()
    labels = {"model_name": "fp4serve-demo", "engine": "0"}
    body = post(demo, "/v1/completions", {"prompt": "Emma", "max_tokens": 5, "ignore_eos": True}).json()
    after = scrape()
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert _sample(after, name, **labels) >= 0
    prompt = _sample(after, "vllm:prompt_tokens_total", **labels) - _sample(
        before, "vllm:prompt_tokens_total", **labels
    )
    generated = _sample(after, "vllm:generation_tokens_total", **labels) - _sample(
        before, "vllm:generation_tokens_total", **labels
    )
    assert prompt == body["usage"]["prompt_tokens"] and generated == 5
    success = "vllm:request_success_total"
    assert _sample(after, success, finished_reason="length") == _sample(before, success, finished_reason="length") + 1
    ttft = "vllm:time_to_first_token_seconds_count"
    assert _sample(after, ttft, **labels) == _sample(before, ttft, **labels) + 1
    itl = "vllm:inter_token_latency_seconds_count"
    assert _sample(after, itl, **labels) == _sample(before, itl, **labels) + 4
    assert _sample(after, "vllm:time_to_first_token_seconds_bucket", le="+Inf") == _sample(after, ttft)
    assert "# TYPE vllm:inter_token_latency_seconds histogram" in after

"""Every error is OpenAI-style JSON with the right status (400/401/404/503), never FastAPI's bare 422."""

from __future__ import annotations

import openai
import pytest
import requests
from conftest import post

USER = [{"role": "user", "content": "Hello"}]
BAD_CALL = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{bad"}}


def assert_error(response: requests.Response, status: int, message: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status and isinstance(error["type"], str) and error["message"]
    if message is not None:
        assert message in error["message"], error["message"]
    return error


def test_malformed_json_and_content_type(demo):
    response = requests.post(
        f"{demo.v1}/chat/completions", data=b"{not json", timeout=30, headers={"Content-Type": "application/json"}
    )
    assert_error(response, 400)
    response = requests.post(
        f"{demo.v1}/chat/completions", data=b'{"messages": []}', timeout=30, headers={"Content-Type": "text/plain"}
    )
    assert_error(response, 400, "Unsupported Media Type: Only 'application/json' is allowed")
    assert_error(post(demo, "/v1/completions", [1, 2, 3]), 400)


@pytest.mark.parametrize(
    ("body", "message", "param"),
    [
        ({}, "Field required", "messages"),
        ({"messages": "hi"}, None, "messages"),
        ({"messages": USER, "temperature": "hot"}, None, "temperature"),
        (
            {"messages": USER, "stream_options": {"include_usage": True}},
            "Stream options can only be defined when `stream=True`.",
            None,
        ),
        ({"messages": USER, "top_logprobs": 2}, "`logprobs` must be set to true", None),
        ({"messages": USER, "tool_choice": "auto"}, "When using `tool_choice`, `tools` must be set.", None),
        ({"messages": USER, "response_format": {"type": "json_schema"}}, "'json_schema' field must be provided", None),
    ],
)
def test_validation_errors_are_400(demo, body, message, param):
    error = assert_error(post(demo, "/v1/chat/completions", body), 400, message)
    if param is not None:
        assert error["param"] == param


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"logprobs": True, "top_logprobs": 21}, "greater than max allowed: 20"),
        ({"n": 0}, "n must be at least 1"),
        ({"min_p": 2.0}, "min_p must be in [0, 1]"),
        ({"temperature": -1}, "temperature must be non-negative"),
        ({"max_tokens": 0}, "max_tokens must be at least 1, got 0."),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "g"}},
            },
            "Tool 'g' has not been passed",
        ),
        ({"chat_template_kwargs": {"tokenize": True}}, "may not contain `tokenize`"),
        (
            {"messages": [*USER, {"role": "assistant", "content": "x", "tool_calls": [BAD_CALL]}, *USER]},
            "not valid JSON",
        ),
    ],
)
def test_bad_values_are_400(demo, extra, message):
    assert_error(post(demo, "/v1/chat/completions", {"messages": USER, **extra}), 400, message)


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        (
            [{"role": "user", "content": "hi"}, {"role": "system", "content": "s"}],
            "System message must be at the beginning.",
        ),
        ([{"role": "system", "content": "s"}], "No user query found in messages."),
        ([], "No messages provided."),
        ([{"role": "developer", "content": "d"}, *USER], "Unexpected message role."),
    ],
)
def test_template_errors_are_400(demo, messages, message):
    assert_error(post(demo, "/v1/chat/completions", {"messages": messages}), 400, message)


def test_unknown_model_is_404_and_empty_model_is_accepted(demo, client):
    error = assert_error(post(demo, "/v1/chat/completions", {"model": "gpt-4", "messages": USER}), 404)
    assert error["message"] == "The model `gpt-4` does not exist." and error["param"] == "model"
    assert_error(post(demo, "/v1/completions", {"model": "nope", "prompt": "x"}), 404, "The model `nope`")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=USER, max_tokens=1)
    for model in ("", None):
        response = post(demo, "/v1/chat/completions", {"model": model, "messages": USER, "max_tokens": 1})
        assert response.status_code == 200, response.text


def test_prompt_too_long_has_vllm_message(demo, client):
    limit = demo.state.max_model_len
    prompt = [11] * (limit - 5)
    error = assert_error(post(demo, "/v1/completions", {"prompt": prompt, "max_tokens": 10}), 400)
    assert error["param"] == "input_tokens"
    assert error["message"] == (
        f"This model's maximum context length is {limit} tokens. However, you requested 10 output tokens and your "
        f"prompt contains {limit - 5} input tokens, for a total of {limit + 5} tokens. Please reduce the length of "
        "the input prompt or the number of requested output tokens."
    )
    error = assert_error(post(demo, "/v1/completions", {"prompt": [11] * (limit + 1), "max_tokens": None}), 400)
    assert f"you requested 0 output tokens and your prompt contains {limit + 1} input tokens" in error["message"]
    error = assert_error(post(demo, "/v1/completions", {"prompt": [11] * limit, "max_tokens": None}), 400)
    assert error["message"] == "max_tokens must be at least 1, got 0." and error["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(model="fp4serve-demo", messages=[{"role": "user", "content": "word " * limit}])


def test_completion_specific_errors(demo):
    assert_error(
        post(demo, "/v1/completions", {"prompt": "x", "suffix": "y"}), 400, "suffix is not currently supported"
    )
    assert_error(post(demo, "/v1/completions", {"prompt": [10**9]}), 400, "out of vocabulary")
    assert_error(post(demo, "/v1/completions", {"prompt": "x", "logprobs": 21}), 400, "max allowed: 20")
    assert_error(post(demo, "/detokenize", {"tokens": [-1]}), 400, "out of vocabulary")


def test_media_on_a_text_only_model(demo):
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]}]
    assert_error(post(demo, "/v1/chat/completions", {"messages": parts}), 400, "has no vision tower")
    audio = {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hear this"}, audio]}]
    assert_error(post(demo, "/v1/chat/completions", {"messages": parts}), 400, "`input_audio` are not supported")


def test_unknown_fields_are_ignored_and_charset_is_fine(demo):
    body = b'{"messages": [{"role": "user", "content": "hi", "x-extra": 1}], "max_tokens": 1, "frobnicate": true}'
    response = requests.post(f"{demo.v1}/chat/completions", data=body, timeout=60,
                             headers={"Content-Type": "application/json; charset=utf-8"})  # fmt: skip
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 1


def test_unknown_route_and_method(demo):
    assert_error(requests.get(f"{demo.url}/v1/nothing", timeout=30), 404)
    assert_error(requests.get(f"{demo.v1}/chat/completions", timeout=30), 405)


def test_api_key(keyed):
    url = keyed.v1
    assert_error(requests.get(f"{url}/models", timeout=30), 401)
    assert_error(requests.get(f"{url}/models", headers={"Authorization": "Bearer wrong"}, timeout=30), 401)
    assert_error(post(keyed, "/v1/chat/completions", {"messages": USER}), 401)
    ok = requests.get(f"{url}/models", headers={"Authorization": "Bearer sesame"}, timeout=30)
    assert ok.status_code == 200
    for path in ("/health", "/metrics", "/version"):
        assert requests.get(f"{keyed.url}{path}", timeout=30).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
    models = openai.OpenAI(base_url=url, api_key="sesame", max_retries=0).models.list()
    assert [m.id for m in models.data] == ["fp4serve-demo"]

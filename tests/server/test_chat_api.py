"""/v1/chat/completions over real HTTP with the official `openai` client, on the real demo model (CPU).

Greedy decoding makes the chat endpoint checkable against the completions endpoint: the chat answer must be the
raw continuation of the rendered prompt (from /tokenize), split into reasoning and content by the qwen3 parser.
"""

from __future__ import annotations

import json

import pytest
from conftest import post

from fp4serve.parsers import parse_reasoning

MESSAGES = [{"role": "user", "content": "Tell me about Mr. Darcy."}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def rendered_ids(demo, messages, **extra) -> list[int]:
    body = {"messages": messages, **extra}
    return post(demo, "/tokenize", body).json()["tokens"]


def raw_continuation(demo, prompt_ids: list[int], max_tokens: int) -> dict:
    body = {"prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    response = post(demo, "/v1/completions", body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


def test_chat_thinking_on_is_the_raw_continuation_as_reasoning(demo, client):
    prompt = rendered_ids(demo, MESSAGES)
    assert demo.state.tokenizer.decode(prompt, skip_special_tokens=False).endswith("<|im_start|>assistant\n<think>\n")
    raw = raw_continuation(demo, prompt, 12)["text"]
    response = client.chat.completions.create(
        model="fp4serve-demo", messages=MESSAGES, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    assert response.id.startswith("chatcmpl-") and response.object == "chat.completion"
    assert response.model == "fp4serve-demo"
    choice = response.choices[0]
    reasoning, content = parse_reasoning(raw, thinking=True)
    message = choice.message.model_dump()
    assert message["role"] == "assistant"
    assert message["reasoning"] == reasoning and message["reasoning_content"] == reasoning
    assert message["content"] == content
    assert message["tool_calls"] == []
    assert choice.finish_reason == "length"
    assert response.usage.prompt_tokens == len(prompt)
    assert response.usage.completion_tokens == 12
    assert response.usage.total_tokens == len(prompt) + 12


def test_chat_thinking_off_is_all_content(demo, client):
    kwargs = {"chat_template_kwargs": {"enable_thinking": False}}
    prompt = rendered_ids(demo, MESSAGES, **kwargs)
    assert demo.state.tokenizer.decode(prompt, skip_special_tokens=False).endswith("<think>\n\n</think>\n\n")
    raw = raw_continuation(demo, prompt, 10)["text"]
    response = client.chat.completions.create(
        model="fp4serve-demo",
        messages=MESSAGES,
        max_tokens=10,
        temperature=0,
        extra_body={"ignore_eos": True, **kwargs},
    )
    message = response.choices[0].message.model_dump()
    assert message["content"] == raw and message["reasoning"] is None
    assert response.usage.prompt_tokens == len(prompt)


def test_streaming_joins_to_the_non_streaming_answer(client):
    common = dict(model="fp4serve-demo", messages=MESSAGES, max_tokens=10, temperature=0)
    whole = client.chat.completions.create(**common, extra_body={"ignore_eos": True})
    chunks = list(
        client.chat.completions.create(
            **common, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}
        )
    )
    ids = {c.id for c in chunks}
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" and c.model == "fp4serve-demo" for c in chunks)
    first = chunks[0].choices[0].delta
    assert first.role == "assistant" and first.content == ""
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 10
    assert usage_chunk.usage.prompt_tokens == whole.usage.prompt_tokens
    deltas = [c.choices[0].delta.model_dump() for c in chunks[1:-1]]
    reasoning = "".join(d.get("reasoning") or "" for d in deltas)
    assert reasoning == (whole.choices[0].message.model_dump()["reasoning"] or "")
    content = "".join(d.get("content") or "" for d in deltas)
    assert content == (whole.choices[0].message.content or "")
    assert chunks[-2].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-2])


def test_raw_sse_ends_with_done(demo):
    body = {"messages": MESSAGES, "max_tokens": 3, "stream": True}
    with post(demo, "/v1/chat/completions", body, stream=True) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines(decode_unicode=True) if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    first = json.loads(events[0][6:])
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "usage" not in json.loads(events[-2][6:])


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_shape(client, stream):
    common = dict(
        model="fp4serve-demo",
        messages=MESSAGES,
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    if stream:
        chunks = list(client.chat.completions.create(**common, stream=True))
        entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    else:
        response = client.chat.completions.create(**common)
        entries = response.choices[0].logprobs.content
    assert len(entries) == 6
    for entry in entries:
        assert entry.logprob <= 0.0 and len(entry.top_logprobs) == 3
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token or entry.bytes
        # greedy: the sampled token is the most likely one
        assert entry.token == entry.top_logprobs[0].token
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-4)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob


def test_n_and_seed(client):
    common = dict(
        model="fp4serve-demo",
        messages=MESSAGES,
        max_tokens=8,
        n=2,
        seed=7,
        temperature=1.0,
        extra_body={"ignore_eos": True},
    )
    first = client.chat.completions.create(**common)
    second = client.chat.completions.create(**common)
    assert [c.index for c in first.choices] == [0, 1]
    assert first.usage.completion_tokens == 16
    texts = [c.message.model_dump()["reasoning"] for c in first.choices]
    assert texts == [c.message.model_dump()["reasoning"] for c in second.choices]


def test_tools_are_rendered_and_tool_choice_none_parses_nothing(demo, client):
    with_tools = rendered_ids(demo, MESSAGES, tools=[WEATHER])
    without = rendered_ids(demo, MESSAGES)
    assert len(with_tools) > len(without)
    assert "get_weather" in demo.state.tokenizer.decode(with_tools)
    response = client.chat.completions.create(
        model="fp4serve-demo", messages=MESSAGES, tools=[WEATHER], tool_choice="none", max_tokens=5, temperature=0
    )
    assert response.usage.prompt_tokens == len(with_tools)
    assert response.choices[0].message.tool_calls in (None, [])
    assert response.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_choice_yields_a_call(client, choice):
    response = client.chat.completions.create(
        model="fp4serve-demo", messages=MESSAGES, tools=[WEATHER], tool_choice=choice, max_tokens=12, temperature=0
    )
    calls = response.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather" and calls[0].type == "function"
    assert calls[0].id.startswith("call_") and len(calls[0].id) == len("call_") + 24
    assert isinstance(json.loads(calls[0].function.arguments), dict)
    expected = "tool_calls" if choice == "required" else response.choices[0].finish_reason
    assert response.choices[0].finish_reason == expected
    assert response.choices[0].finish_reason in ("tool_calls", "stop", "length")


def test_forced_tool_choice_streams_a_call(client):
    stream = client.chat.completions.create(
        model="fp4serve-demo",
        messages=MESSAGES,
        tools=[WEATHER],
        tool_choice="required",
        max_tokens=12,
        temperature=0,
        stream=True,
    )
    headers, arguments = [], ""
    finish = None
    for chunk in stream:
        for call in chunk.choices[0].delta.tool_calls or []:
            if call.id:
                headers.append((call.id, call.function.name))
            arguments += call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert len(headers) == 1 and headers[0][1] == "get_weather"
    assert isinstance(json.loads(arguments), dict)
    assert finish == "tool_calls"


def test_auto_tools_with_plain_text_output(client):
    response = client.chat.completions.create(
        model="fp4serve-demo",
        messages=MESSAGES,
        tools=[WEATHER],
        max_tokens=6,
        temperature=0,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    message = response.choices[0].message
    assert message.tool_calls in (None, []) and message.content
    assert response.choices[0].finish_reason in ("stop", "length")


def test_continue_final_message_with_echo(demo):
    messages = [*MESSAGES, {"role": "assistant", "content": "Mr. Darcy is"}]
    body = {
        "messages": messages,
        "continue_final_message": True,
        "add_generation_prompt": False,
        "echo": True,
        "max_tokens": 4,
        "temperature": 0,
        "ignore_eos": True,
        "chat_template_kwargs": {"enable_thinking": False},
    }
    response = post(demo, "/v1/chat/completions", body)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"].startswith("Mr. Darcy is")
    prompt = rendered_ids(demo, messages, continue_final_message=True, add_generation_prompt=False)
    assert demo.state.tokenizer.decode(prompt, skip_special_tokens=False).endswith("Mr. Darcy is")

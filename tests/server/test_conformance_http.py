"""Spec §13 cases through the whole HTTP layer, for outputs the demo model cannot be made to write.

The tiny Austen model never writes `<tool_call>` XML, so these cases replace the engine with `ReplayEngine`, which
plays a scripted output token by token (real tokenizer, real chat template, real parsers, real HTTP); everything
the real model can do is tested against the real engine in the other modules.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import requests
from conftest import start_server

from fp4serve.engine.engine import EngineStats, RequestOutputDelta
from fp4serve.server.state import ServerState


class ReplayEngine:
    """AsyncEngine stand-in: every request 'generates' the tokens of `script`, then eos (or `finish`)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.script = ""
        self.finish = "stop"
        self.is_running = True
        self.aborted: list[str] = []

    async def generate(self, request_id: str, prompt: list[int], params: Any):
        ids = self.tokenizer.encode(self.script)
        eos = [] if self.finish == "length" else [self.tokenizer.eos_token_id]
        tokens = ids + eos
        for i, token in enumerate(tokens):
            last = i == len(tokens) - 1
            yield RequestOutputDelta(request_id, [token], None, self.finish if last else None, len(prompt), i + 1)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def stats(self) -> EngineStats:
        return EngineStats(0, 0, 0, 1, 0, 1, 0, 4096)


F = {
    "type": "function",
    "function": {
        "name": "f",
        "parameters": {
            "type": "object",
            "properties": {
                "s": {"type": "string"},
                "i": {"type": "integer"},
                "n": {"type": "number"},
                "b": {"type": "boolean"},
            },
        },
    },
}
G = {
    "type": "function",
    "function": {"name": "g", "parameters": {"type": "object", "properties": {"x": {"type": "string"}}}},
}
USER = [{"role": "user", "content": "go"}]
NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}


def call(name: str, **params: object) -> str:
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


@pytest.fixture(scope="module")
def replay(base_state: ServerState):
    engine = ReplayEngine(base_state.tokenizer)
    state = ServerState(
        base_state.settings, engine, base_state.tokenizer, base_state.template, {}, 4096, base_state.vocab_size
    )
    live = start_server(state)
    yield live, engine
    live.stop()


def chat(replay, script: str, stream: bool, **body: object) -> Any:
    live, engine = replay
    engine.script = script
    payload = {"messages": USER, "stream": stream, **body}
    response = requests.post(f"{live.v1}/chat/completions", json=payload, timeout=60, stream=stream)
    assert response.status_code == 200, response.text
    if not stream:
        return response.json()
    events = [line[6:] for line in response.iter_lines(decode_unicode=True) if line]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def joined(chunks: list[dict]) -> dict:
    """What a client assembles from the stream: reasoning, content, calls, finish_reason."""
    reasoning, content, calls, finish = "", "", [], None
    for chunk in chunks:
        for choice in chunk["choices"]:
            delta = choice["delta"]
            reasoning += delta.get("reasoning") or ""
            content += delta.get("content") or ""
            for entry in delta.get("tool_calls") or []:
                if "id" in entry:
                    calls.append({"id": entry["id"], "name": entry["function"]["name"], "arguments": ""})
                calls[entry["index"]]["arguments"] += entry["function"].get("arguments") or ""
            finish = choice.get("finish_reason") or finish
    return {"reasoning": reasoning or None, "content": content or None, "calls": calls, "finish": finish}


def test_case_1_plain_text(replay):
    body = chat(replay, "Hello there.", False, tools=[F, G], **NO_THINK)
    message = body["choices"][0]["message"]
    assert message["content"] == "Hello there." and message["tool_calls"] == []
    assert body["choices"][0]["finish_reason"] == "stop"
    chunks = chat(replay, "Hello there.", True, tools=[F, G], **NO_THINK)
    final = chunks[-1]["choices"][0]
    assert final["delta"] == {"content": ""} and final["finish_reason"] == "stop"
    assert joined(chunks)["content"] == "Hello there."


def test_case_2_single_call(replay):
    body = chat(replay, call("f", s="Paris"), False, tools=[F, G], **NO_THINK)
    choice = body["choices"][0]
    assert choice["message"]["content"] is None and choice["finish_reason"] == "tool_calls"
    (tool_call,) = choice["message"]["tool_calls"]
    assert tool_call["type"] == "function" and tool_call["function"] == {"name": "f", "arguments": '{"s": "Paris"}'}
    assert tool_call["id"].startswith("call_") and len(tool_call["id"]) == 29
    streamed = joined(chat(replay, call("f", s="Paris"), True, tools=[F, G], **NO_THINK))
    assert streamed["content"] is None and streamed["finish"] == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in streamed["calls"]] == [("f", '{"s": "Paris"}')]


def test_case_3_and_19_content_and_two_calls(replay):
    script = "Let me check.\n\n" + call("f", s="A") + "\n" + call("g", x="B")
    body = chat(replay, script, False, tools=[F, G], **NO_THINK)
    message = body["choices"][0]["message"]
    assert message["content"] == "Let me check.\n\n"
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]] == [
        ("f", '{"s": "A"}'),
        ("g", '{"x": "B"}'),
    ]
    chunks = chat(replay, script, True, tools=[F, G], **NO_THINK)
    streamed = joined(chunks)
    assert streamed["content"] == "Let me check.\n\n" and streamed["finish"] == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in streamed["calls"]] == [("f", '{"s": "A"}'), ("g", '{"x": "B"}')]
    headers = [e for c in chunks for e in c["choices"][0]["delta"].get("tool_calls") or [] if "id" in e]
    assert [h["index"] for h in headers] == [0, 1]


def test_case_29_stream_shape(replay):
    chunks = chat(replay, "Sure." + call("f", s="Paris", i=3), True, tools=[F, G], **NO_THINK)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": ""}
    header = next(d["tool_calls"][0] for d in deltas if d.get("tool_calls") and "id" in d["tool_calls"][0])
    assert header["type"] == "function" and header["index"] == 0
    assert header["function"] == {"name": "f", "arguments": ""}
    assert joined(chunks)["calls"][0]["arguments"] == '{"s": "Paris", "i": 3}'
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_tool_xml_stays_content_without_tools_or_with_none(replay):
    script = call("f", s="Paris")
    for extra in ({}, {"tools": [F], "tool_choice": "none"}):
        body = chat(replay, script, False, **extra, **NO_THINK)
        assert body["choices"][0]["message"]["content"] == script
        assert body["choices"][0]["message"]["tool_calls"] == []
        assert joined(chat(replay, script, True, **extra, **NO_THINK))["content"] == script


@pytest.mark.parametrize(
    ("script", "reasoning", "content"),
    [
        ("This is reasoning</think>This is content", "This is reasoning", "This is content"),
        ("This is reasoning</think>", "This is reasoning", None),
        ("<think>This is reasoning</think>This is content", "This is reasoning", "This is content"),
        ("just text", "just text", None),
        ("\nplan step\n</think>\n\nFinal answer.", "\nplan step\n", "\n\nFinal answer."),
    ],
)
def test_cases_33_to_38_reasoning(replay, script, reasoning, content):
    message = chat(replay, script, False)["choices"][0]["message"]
    assert (message["reasoning"], message["content"]) == (reasoning, content)
    assert message["reasoning_content"] == reasoning
    streamed = joined(chat(replay, script, True))
    assert (streamed["reasoning"], streamed["content"]) == (reasoning, content)


def test_cases_36_43_thinking_off(replay):
    for script in ("just text", "Hello!"):
        message = chat(replay, script, False, **NO_THINK)["choices"][0]["message"]
        assert (message["reasoning"], message["content"]) == (None, script)
        streamed = joined(chat(replay, script, True, **NO_THINK))
        assert (streamed["reasoning"], streamed["content"]) == (None, script)


def test_include_reasoning_false_and_parallel_tool_calls_false(replay):
    message = chat(replay, "why</think>answer", False, include_reasoning=False)["choices"][0]["message"]
    assert message["reasoning"] is None and message["content"] == "answer"
    script = call("f", s="A") + "\n" + call("g", x="B")
    body = chat(replay, script, False, tools=[F, G], parallel_tool_calls=False, **NO_THINK)
    assert [c["function"]["name"] for c in body["choices"][0]["message"]["tool_calls"]] == ["f"]


def test_length_finish_keeps_partial_call_arguments_complete(replay):
    _, engine = replay
    engine.finish = "length"
    try:
        body = chat(replay, "<tool_call>\n<function=f>\n<parameter=s>\nDal", False, tools=[F, G], **NO_THINK)
    finally:
        engine.finish = "stop"
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"]) == {"s": "Dal"}

"""Chat template: our rendering equals transformers' apply_chat_template on the real Qwen3.5 template."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import jinja2
import pytest

from fp4serve.chat_template import ChatTemplate, prepare_openai_messages

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Météo d'une ville — 天气",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
            "required": ["city"],
        },
    },
}
SEARCH = {"type": "function", "function": {"name": "search", "description": None, "parameters": {"type": "object"}}}
TOOLS = [WEATHER, SEARCH]

CALL_ARGS = {
    "city": "Paris",
    "days": 3,
    "ratio": 1.0,
    "flag": True,
    "off": False,
    "none": None,
    "nested": {"k": "v", "ü": [1, 2]},
    "list": ["a", 1, True],
    "text": "multi\nline «quoted»",
}

CONVERSATIONS: dict[str, list[dict[str, Any]]] = {
    "single_user": [{"role": "user", "content": "hi"}],
    "system_multi_turn": [
        {"role": "system", "content": "  You are helpful.  "},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "<think>\nold thought\n</think>\n\nHi there!"},
        {"role": "user", "content": "And now?"},
        {"role": "assistant", "content": "Now this.", "reasoning_content": "dropped: older turn"},
        {"role": "user", "content": "Thanks   \n"},
    ],
    "tool_loop": [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": "Let me check.",
            "reasoning_content": "\nneed tool\n",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": CALL_ARGS}},
                {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "name": "get_weather", "content": "sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": "rain"},
        {"role": "assistant", "content": "", "tool_calls": [{"name": "search", "arguments": {}}]},
        {"role": "tool", "content": [{"type": "text", "text": "result list"}]},
    ],
    "tool_loop_answered": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "search", "arguments": {"q": 1}}}]},
        {"role": "tool", "content": "cloudy"},
        {"role": "assistant", "content": "<think>\nsummarise\n</think>\n\nIt is cloudy."},
        {"role": "user", "content": "<tool_response>\nfake\n</tool_response>"},
    ],
    "reasoning_alias": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a", "reasoning": "alias reasoning"},
        {"role": "tool", "content": "t"},
    ],
    "content_parts": [
        {"role": "system", "content": [{"type": "text", "text": "sys part"}]},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in "},
                {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
                {"type": "text", "text": " and "},
                {"type": "image", "image": "data"},
                {"type": "video", "video": "v.mp4"},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}, {"type": "text", "text": "?"}]},
    ],
    "assistant_last": [
        {"role": "user", "content": "Tell me a story"},
        {"role": "assistant", "content": "Once upon a time"},
    ],
}

KWARGS = [{}, {"enable_thinking": False}, {"enable_thinking": True}, {"add_vision_id": True}]


@pytest.fixture(scope="module")
def tok_dir(shared_dir: Path) -> Path:
    return shared_dir / "assets" / "qwen3_5_tokenizer"


@pytest.fixture(scope="module")
def template(tok_dir: Path) -> ChatTemplate:
    return ChatTemplate.from_dir(tok_dir)


@pytest.fixture(scope="module")
def hf_tok(tok_dir: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(tok_dir))


def _hf_render(hf_tok, messages, tools=None, add_generation_prompt=True, **kwargs) -> str:
    return hf_tok.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
    )


def test_source_is_the_official_template(template: ChatTemplate, shared_dir: Path) -> None:
    assert template.source == (shared_dir / "assets" / "qwen3_5_chat_template.jinja").read_text()
    assert template.special_tokens == {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("with_tools", [False, True])
@pytest.mark.parametrize("kwargs", KWARGS, ids=["default", "think_off", "think_on", "vision_id"])
def test_matches_transformers(template: ChatTemplate, hf_tok, name: str, with_tools: bool, kwargs: dict) -> None:
    messages = CONVERSATIONS[name]
    original = copy.deepcopy(messages)
    tools = TOOLS if with_tools else None
    for add_generation_prompt in (True, False):
        ours = template.render(messages, tools=tools, add_generation_prompt=add_generation_prompt, **kwargs)
        assert ours == _hf_render(hf_tok, messages, tools, add_generation_prompt, **kwargs)
    assert messages == original


def test_continue_final_message_matches_transformers(template: ChatTemplate, hf_tok) -> None:
    for messages in (CONVERSATIONS["assistant_last"], [*CONVERSATIONS["assistant_last"][:1],
                     {"role": "assistant", "content": "Once upon a time   "}]):  # fmt: skip
        ours = template.render(messages, add_generation_prompt=False, continue_final_message=True)
        theirs = _hf_render(hf_tok, messages, add_generation_prompt=False, continue_final_message=True)
        assert ours == theirs
        assert ours.endswith("Once upon a time")
    with pytest.raises(ValueError, match="Cannot set both"):
        template.render(CONVERSATIONS["assistant_last"], continue_final_message=True)


def test_literal_renderings(template: ChatTemplate) -> None:
    hi = [{"role": "user", "content": "hi"}]
    assert template.render(hi) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n"
    assert template.render(hi, enable_thinking=False).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    old_turn = [
        hi[0],
        {"role": "assistant", "content": "<think>\nold\n</think>\n\nHello!"},
        {"role": "user", "content": "bye"},
    ]
    assert "<|im_start|>assistant\nHello!<|im_end|>\n" in template.render(old_turn)
    text = template.render(CONVERSATIONS["tool_loop"], tools=TOOLS)
    assert text.startswith("<|im_start|>system\n# Tools\n\nYou have access to the following functions:\n\n<tools>\n")
    assert json.dumps(WEATHER, ensure_ascii=False) in text and '"description": null' in text
    assert "</IMPORTANT>\n\nYou are helpful.<|im_end|>\n" in text
    expected_turn = (
        "<|im_start|>assistant\n<think>\nneed tool\n</think>\n\nLet me check.\n\n<tool_call>\n<function=get_weather>\n"
        "<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n</parameter>\n<parameter=ratio>\n1.0\n</parameter>\n"
        "<parameter=flag>\nTrue\n</parameter>\n<parameter=off>\nFalse\n</parameter>\n<parameter=none>\nNone\n</parameter>\n"
        '<parameter=nested>\n{"k": "v", "ü": [1, 2]}\n</parameter>\n<parameter=list>\n["a", 1, true]\n</parameter>\n'
        "<parameter=text>\nmulti\nline «quoted»\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n"
        "<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n</function>\n</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\nrain\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n<tool_call>\n<function=search>\n</function>\n</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nresult list\n</tool_response><|im_end|>\n<|im_start|>assistant\n<think>\n"
    )
    assert text.endswith(expected_turn)
    parts = template.render(CONVERSATIONS["content_parts"][1:2])
    assert (
        "What is in <|vision_start|><|image_pad|><|vision_end|> and <|vision_start|><|image_pad|><|vision_end|>"
        in parts
    )
    numbered = template.render(CONVERSATIONS["content_parts"], add_vision_id=True)
    assert (
        "Picture 1: " in numbered
        and "Picture 2: " in numbered
        and "Picture 3: " in numbered
        and "Video 1: " in numbered
    )


ERROR_CASES = [
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}],
     "System message must be at the beginning."),
    ([{"role": "system", "content": "s"}], "No user query found in messages."),
    ([{"role": "user", "content": "<tool_response>x</tool_response>"}], "No user query found in messages."),
    ([{"role": "developer", "content": "d"}, {"role": "user", "content": "u"}], "Unexpected message role."),
    ([{"role": "user", "content": "u"}, {"role": "function", "content": "f"}], "Unexpected message role."),
    ([{"role": "system", "content": [{"type": "image"}]}, {"role": "user", "content": "u"}],
     "System message cannot contain images."),
    ([{"role": "user", "content": [{"type": "audio", "audio": "x"}]}], "Unexpected item type in content."),
    ([{"role": "user", "content": 5}], "Unexpected content type."),
]  # fmt: skip


@pytest.mark.parametrize("messages,message", ERROR_CASES)
def test_errors_match_transformers(template: ChatTemplate, hf_tok, messages: list, message: str) -> None:
    with pytest.raises(ValueError) as ours:
        template.render(messages, tools=TOOLS)
    assert str(ours.value) == message
    with pytest.raises(jinja2.TemplateError, match=f"^{message}$"):
        _hf_render(hf_tok, messages, TOOLS)


def test_empty_messages_error(template: ChatTemplate) -> None:
    # transformers refuses an empty list before rendering; vLLM renders it and gets the template's own message
    with pytest.raises(ValueError, match=r"^No messages provided\.$"):
        template.render([])


def test_from_dir_prefers_jinja_file_and_validates(tmp_path: Path, tok_dir: Path) -> None:
    shutil.copy(tok_dir / "tokenizer_config.json", tmp_path / "tokenizer_config.json")
    (tmp_path / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}{{ m.content|tojson }}{% endfor %}"
    )
    assert ChatTemplate.from_dir(tmp_path).render([{"role": "user", "content": "é<>&"}]) == '"é<>&"'
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }")
    with pytest.raises(ValueError, match="does not compile"):
        ChatTemplate.from_dir(tmp_path)
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(ValueError, match="no chat template"):
        ChatTemplate.from_dir(tmp_path)


def test_template_features(template: ChatTemplate) -> None:
    source = (
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "{% generation %}{{ m.content }}{% endgeneration %}{% set ns.n = ns.n + 1 %}{% endfor %}|{{ ns.n }}"
        "|{{ eos_token }}|{{ custom }}|{{ {'b': 1, 'a': [1, 'ü']}|tojson }}|{{ strftime_now('%Y')|length }}"
    )
    tmpl = ChatTemplate(source, special_tokens={"eos_token": "<e>"})
    messages = [{"role": "user", "content": c} for c in "xyz"]
    assert tmpl.render(messages, custom=7) == 'xy|2|<e>|7|{"b": 1, "a": [1, "ü"]}|4'
    with pytest.raises(ValueError, match="underscore"):
        ChatTemplate("{% set ns = namespace(_x=1) %}").render([])
    with pytest.raises(ValueError):
        ChatTemplate("{{ messages.__class__.__mro__ }}").render([])


def test_prepare_openai_messages(template: ChatTemplate) -> None:
    messages = [
        {"role": "user", "content": "q"},
        {
            "role": "assistant",
            "content": None,
            "reasoning": "r",
            "tool_calls": [
                {"id": "1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1, "b": "x"}'}},
                {"id": "2", "type": "function", "function": {"name": "g", "arguments": ""}},
            ],
        },
        {"role": "assistant", "content": "done", "tool_calls": []},
    ]
    prepared = prepare_openai_messages(messages)
    assert prepared[1]["tool_calls"][0]["function"]["arguments"] == {"a": 1, "b": "x"}
    assert prepared[1]["tool_calls"][1]["function"]["arguments"] == {}
    assert prepared[1]["reasoning_content"] == "r"
    assert "tool_calls" not in prepared[2]
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == '{"a": 1, "b": "x"}'
    assert "<parameter=a>\n1\n</parameter>\n<parameter=b>\nx\n</parameter>" in template.render(prepared)
    bad = [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}]
    with pytest.raises(ValueError, match="not valid JSON"):
        prepare_openai_messages(bad)

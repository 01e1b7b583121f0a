"""Chat template rendering that reproduces Hugging Face's `apply_chat_template(..., tokenize=False)`.

The template is the checkpoint's own Jinja source (`chat_template.jinja`, else `tokenizer_config.json`'s
`chat_template`), rendered in a sandboxed Jinja environment set up the way transformers sets up its own:
`trim_blocks` and `lstrip_blocks`, the loop-controls extension, a `tojson` filter that is plain `json.dumps`
(`ensure_ascii=False`, default `", "`/`": "` separators, no key sorting, no HTML escaping), `raise_exception`,
`strftime_now`, and the tokenizer's special tokens (`eos_token`, ...) as variables. Messages are handed over as
plain JSON data with `None`-valued keys dropped and the reasoning aliases (`reasoning`, `thinking`) copied into
`reasoning_content`, as transformers does.

Every template failure (its own `raise_exception`, an undefined variable, a sandbox violation) becomes a
`ValueError` carrying the template's message, which the server turns into a 400 as vLLM does. The OpenAI-side
preparation that vLLM does before the template (JSON-string tool-call arguments into dicts) is the separate
`prepare_openai_messages`, so `render` stays a faithful copy of the HF behaviour.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

_CONTINUE_MARKER = "\x00fp4serve-continue\x00"
_REASONING_ALIASES = ("reasoning_content", "thinking", "reasoning")
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:  # fmt: skip
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _SafeNamespace(Namespace):
    """`namespace()` that refuses underscore attributes, so templates cannot reach Python internals through it."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _SafeNamespace._check(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _SafeNamespace._check(name)
        Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with an underscore")


class _GenerationTag(Extension):
    """Accepts HF's `{% generation %}...{% endgeneration %}` (assistant-mask markers) and renders the body as is."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _SafeNamespace
    return env


def _plain(value: Any) -> Any:
    """A deep copy of `value` made of JSON types only (pydantic models and dataclasses are dumped first)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _prepare_messages(messages: Sequence[Any]) -> list[dict[str, Any]]:
    prepared = []
    for message in _plain(list(messages)):
        if not isinstance(message, dict):
            raise ValueError(f"chat messages must be objects with a role and content, got {message!r}")
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_ALIASES if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        prepared.append(message)
    return prepared


def _mark_final_message(message: dict[str, Any], marker: str) -> None:
    content = message.get("content")
    if isinstance(content, str):
        message["content"] = content + marker
        return
    if isinstance(content, list):
        for part in reversed(content):
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                part["text"] += marker
                return
    raise ValueError("continue_final_message is set but the final message has no text content to continue")


class ChatTemplate:
    """A compiled chat template; `render` gives the prompt text exactly as HF's `apply_chat_template` does."""

    def __init__(self, source: str, *, special_tokens: Mapping[str, str] | None = None) -> None:
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ValueError(f"chat template does not compile: {exc.message} (line {exc.lineno})") from exc

    @classmethod
    def from_dir(cls, path: str | Path) -> ChatTemplate:
        """`chat_template.jinja` of `path` if present, else `tokenizer_config.json`'s `chat_template`."""
        path = Path(path)
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        special = {}
        for key in _SPECIAL_TOKEN_KEYS:
            value = config.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                special[key] = value
        jinja_file = path / "chat_template.jinja"
        if jinja_file.is_file():
            return cls(jinja_file.read_text(encoding="utf-8"), special_tokens=special)
        source = config.get("chat_template")
        if isinstance(source, list):
            # the named-templates form: [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        if not isinstance(source, str):
            raise ValueError(f"no chat template in {path}: expected chat_template.jinja or a chat_template string "
                             f"in tokenizer_config.json")  # fmt: skip
        return cls(source, special_tokens=special)

    def render(
        self,
        messages: Sequence[Any],
        tools: Sequence[Any] | None = None,
        add_generation_prompt: bool = True,
        *,
        continue_final_message: bool = False,
        **template_kwargs: Any,
    ) -> str:
        """Render `messages` (and `tools`) to prompt text; `template_kwargs` become template variables.

        `continue_final_message` leaves the last message open (no end-of-turn) so the model continues it.
        """
        if continue_final_message and add_generation_prompt:
            raise ValueError("Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
        chat = _prepare_messages(messages)
        if continue_final_message:
            if not chat:
                raise ValueError("continue_final_message is set but there are no messages")
            # a trailing space tells us whether the template kept or trimmed the message's end
            _mark_final_message(chat[-1], _CONTINUE_MARKER + " ")
        variables = {**self.special_tokens, **_plain(template_kwargs)}
        try:
            text = self._template.render(
                messages=chat,
                tools=_plain(list(tools)) if tools is not None else None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except jinja2.TemplateError as exc:
            raise ValueError(exc.message or str(exc)) from exc
        if continue_final_message:
            cut = text.rfind(_CONTINUE_MARKER)
            if cut < 0:
                raise ValueError("continue_final_message is set but the chat template dropped the final message")
            kept_spacing = text.startswith(_CONTINUE_MARKER + " ", cut)
            text = text[:cut] if kept_spacing else text[:cut].rstrip()
        return text


def prepare_openai_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """vLLM's preparation of OpenAI chat messages before the template.

    Assistant `tool_calls[].function.arguments` JSON strings become dicts (empty or missing → `{}`), an empty
    `tool_calls` list is removed, and `reasoning` is also given as `reasoning_content`. Invalid JSON arguments are
    a `ValueError` (HTTP 400).
    """
    prepared = []
    for index, message in enumerate(_plain(list(messages))):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{index}] must be an object, got {message!r}")
        if message.get("role") == "assistant" and "tool_calls" in message:
            calls = message["tool_calls"]
            if not calls:
                del message["tool_calls"]
            for call in calls or []:
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict):
                    continue
                arguments = function.get("arguments")
                if arguments is None or (isinstance(arguments, str) and not arguments.strip()):
                    function["arguments"] = {}
                elif isinstance(arguments, str):
                    try:
                        function["arguments"] = json.loads(arguments)
                    except json.JSONDecodeError as exc:
                        raise ValueError(
                            f"messages[{index}]: tool call arguments of {function.get('name')!r} are not valid "
                            f"JSON: {exc}"
                        ) from exc
        if message.get("reasoning") is not None and message.get("reasoning_content") is None:
            message["reasoning_content"] = message["reasoning"]
        prepared.append(message)
    return prepared

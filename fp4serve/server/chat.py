"""Turn a chat request into the prompt text, the way vLLM prepares messages for the Qwen3.5 template.

Before the template runs, messages are normalised as vLLM does (`chat_template.prepare_openai_messages`: JSON-string
tool-call arguments become dicts, reasoning is also handed over as `reasoning_content`) and tools are passed as
their full dumps (a missing description renders as null). Content parts stay lists, so images and text stay inline
where the template puts them (spec §12b); each image/video part is handed over as a bare `{"type": "image"}` /
`{"type": "video"}`, as vLLM does, so `video_url` parts render too and no media payload passes through the template.

Whether the model starts inside a think block is read from the rendered prompt (spec §12b: did the prompt's last
think tag open or close?), never from `enable_thinking` alone. `required` and named `tool_choice` cannot be enforced
by a grammar yet; instead the start of a call is appended to the prompt, closing an open think block first:
`<tool_call>\\n<function=NAME>\\n` for a named tool (or `required` with a single tool), `<tool_call>\\n<function=`
for `required` among several tools. The model must then write a call, and the tool parser reads the appended text
as if the model had written it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fp4serve.chat_template import prepare_openai_messages
from fp4serve.parsers import thinking_from_prompt
from fp4serve.server.errors import bad_request
from fp4serve.server.media import placeholder_parts
from fp4serve.server.protocol import ChatMessage, NamedToolChoice, Tool

THINK_CLOSE = "</think>"


@dataclass(frozen=True)
class RenderedChat:
    prompt: str
    # the model continues inside a think block (reasoning first)
    thinking: bool
    # text appended to the prompt to force a tool call; the parsers see it as the start of the output
    forced_prefix: str = ""


def prepare_tools(tools: list[Tool] | None) -> list[dict[str, Any]] | None:
    if not tools:
        return None
    return [tool.model_dump(by_alias=True) for tool in tools]


def forced_tool_prefix(tool_choice: str | NamedToolChoice, tools: list[Tool] | None) -> str:
    """The start of a call the model must continue: the whole header when the function is known."""
    if isinstance(tool_choice, NamedToolChoice):
        return f"<tool_call>\n<function={tool_choice.function.name}>\n"
    if tool_choice == "required" and tools:
        if len(tools) == 1:
            return f"<tool_call>\n<function={tools[0].function.name}>\n"
        return "<tool_call>\n<function="
    return ""


def render_chat(
    template: Any,
    messages: list[ChatMessage],
    *,
    tools: list[Tool] | None,
    tool_choice: str | NamedToolChoice,
    add_generation_prompt: bool,
    continue_final_message: bool,
    template_kwargs: dict[str, Any],
    render_tools: bool = True,
) -> RenderedChat:
    """Render `messages` with `template` (a `ChatTemplate`); template errors become 400."""
    try:
        prepared = prepare_openai_messages([message.model_dump() for message in messages])
        for message in prepared:
            if isinstance(message.get("content"), list):
                message["content"] = placeholder_parts(message["content"])
        prompt = template.render(
            prepared,
            tools=prepare_tools(tools) if render_tools else None,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            **template_kwargs,
        )
    except ValueError as exc:
        raise bad_request(str(exc)) from exc
    thinking = thinking_from_prompt(prompt, bool(template_kwargs.get("enable_thinking", True)))
    prefix = forced_tool_prefix(tool_choice, tools) if add_generation_prompt else ""
    if not prefix:
        return RenderedChat(prompt=prompt, thinking=thinking)
    # a forced call skips the reasoning: close the think block the way the template does when thinking is off
    close = f"\n{THINK_CLOSE}\n\n" if thinking else ""
    return RenderedChat(prompt=prompt + close + prefix, thinking=False, forced_prefix=prefix)

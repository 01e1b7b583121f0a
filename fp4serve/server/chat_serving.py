"""`POST /v1/chat/completions`: render → generate → reasoning and tool parsing → response or SSE chunks.

Each choice is generated as its own engine request. Its text goes through the parsers of `fp4serve.parsers`: the
one-shot `parse_reasoning` / `parse_tool_calls` for a whole response, `ChatStreamParser` for a stream; the two
agree for every split of the text, so streaming and non-streaming clients see the same reasoning, content and
calls. Logprobs of steps whose text the parser holds back are carried to the next chunk that goes out, so a stream
always carries one logprob entry per generated token.

Requests with images or videos are planned in a worker thread (`plan_chat_async`): decoding and resizing media
must not block the event loop. Their MRoPE positions and pixels travel with each choice's engine request, and the
engine runs the vision tower once per request before prefill reaches the placeholders.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from fp4serve.server.chat import RenderedChat, render_chat
from fp4serve.server.errors import APIError, bad_request, error_body
from fp4serve.server.generation import TextDelta, Ticket
from fp4serve.server.media import collect_media, multimodal_input
from fp4serve.server.params import check_n, check_unsupported, sampling_params, token_budget, usage_flags
from fp4serve.server.protocol import ChatCompletionRequest, NamedToolChoice
from fp4serve.server.responses import (
    SSE_DONE,
    TokenLogprob,
    chat_choice,
    chat_chunk,
    chat_completion,
    chat_logprobs_content,
    chat_message,
    now,
    sse,
    stream_usage,
    tool_call_item,
    usage,
)
from fp4serve.server.streaming import merge

REASONING_KEYS = ("reasoning", "reasoning_content")


@dataclass(frozen=True)
class ChatPlan:
    """How the output of every choice of one request is parsed."""

    rendered: RenderedChat
    tools: list[dict[str, Any]] | None  # tools handed to the tool parser; None: no tool parsing
    tool_mode: str  # "auto", "required", "named" or "none"
    named: str | None
    reasoning: bool  # the reasoning parser is on
    include_reasoning: bool
    parallel_tool_calls: bool

    def finish_reason(self, engine_reason: str | None, called: bool) -> str | None:
        if self.tool_mode == "auto" and called:
            return "tool_calls"
        if self.tool_mode == "required" and (called or engine_reason == "stop"):
            return "tool_calls"
        return engine_reason


@dataclass
class ChatRun:
    request_id: str
    created: int
    model: str
    prompt_ids: list[int]
    params: list[Any]
    plan: ChatPlan
    top_logprobs: int | None
    include_usage: bool
    continuous_usage: bool
    engine_ids: list[str] = field(default_factory=list)
    ticket: Ticket | None = None
    return_token_ids: bool = False
    mm_inputs: Any = None  # MultimodalPrompt when the messages carry images or videos
    echo: str = ""  # `echo`: the final assistant message's text, put before the generated content


def plan_chat(state: Any, req: ChatCompletionRequest) -> ChatRun:
    """Validate the request and prepare everything up to the engine; every user error is raised here (400/404)."""
    settings = state.settings
    state.check_model(req.model)
    check_unsupported(req)
    n = check_n(req.n)
    if req.chat_template is not None:
        raise bad_request(
            "chat_template in a request is not supported; the model's own chat template is used", param="chat_template"
        )
    top = req.num_top_logprobs
    if top is not None and top > settings.max_logprobs:
        raise bad_request(
            f"Requested top_logprobs of {top}, which is greater than max allowed: {settings.max_logprobs}",
            param="top_logprobs",
        )
    tool_choice = req.effective_tool_choice
    if tool_choice == "auto" and req.tools and not settings.auto_tools:
        raise bad_request('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set')
    template_kwargs = dict(req.chat_template_kwargs or {})
    if req.reasoning_effort is not None:
        template_kwargs.setdefault("reasoning_effort", req.reasoning_effort)
    if req.reasoning_effort == "none":
        template_kwargs.setdefault("enable_thinking", False)
    images, videos = collect_media(req.messages)
    rendered = render_chat(
        state.template,
        req.messages,
        tools=req.tools,
        tool_choice=tool_choice,
        add_generation_prompt=req.add_generation_prompt,
        continue_final_message=req.continue_final_message,
        template_kwargs=template_kwargs,
        render_tools=not (tool_choice == "none" and settings.exclude_tools_when_tool_choice_none),
    )
    prompt_ids = state.tokenizer.encode(rendered.prompt)
    if req.truncate_prompt_tokens is not None and req.truncate_prompt_tokens >= 0:
        prompt_ids = prompt_ids[-req.truncate_prompt_tokens :] if req.truncate_prompt_tokens else []
    if not prompt_ids:
        raise bad_request("the rendered prompt is empty", param="messages")
    mm_inputs = None
    if images or videos:
        mm_inputs = multimodal_input(
            state, prompt_ids, images, videos, max_model_len=state.max_model_len, max_new_tokens=req.max_new_tokens
        )
        prompt_ids = list(mm_inputs.token_ids)
    budget = token_budget(
        len(prompt_ids), req.max_new_tokens, state.max_model_len, state.generation_config.get("max_new_tokens")
    )
    params = [
        sampling_params(
            req,
            max_tokens=budget,
            logprobs=top,
            generation_config=state.generation_config,
            tokenizer=state.tokenizer,
            vocab_size=state.vocab_size,
            choice_index=i,
        )
        for i in range(n)
    ]
    tools = [tool.model_dump(by_alias=True) for tool in req.tools or []]
    if isinstance(tool_choice, NamedToolChoice):
        mode, named = "named", tool_choice.function.name
        tools = [tool for tool in tools if tool["function"]["name"] == named]
    else:
        mode, named = str(tool_choice), None
    plan = ChatPlan(
        rendered=rendered,
        tools=tools if mode != "none" and tools else None,
        tool_mode=mode if tools else "none",
        named=named,
        reasoning=settings.reasoning_parser is not None,
        include_reasoning=req.include_reasoning,
        parallel_tool_calls=req.parallel_tool_calls is not False,
    )
    include_usage, continuous = usage_flags(req.stream, req.stream_options, settings.enable_force_include_usage)
    return ChatRun(
        request_id=f"chatcmpl-{state.request_id(req.request_id)}",
        created=now(),
        model=settings.model_name,
        prompt_ids=prompt_ids,
        params=params,
        plan=plan,
        top_logprobs=top,
        include_usage=include_usage,
        continuous_usage=continuous,
        engine_ids=[f"{secrets.token_hex(8)}-{i}" for i in range(n)],
        return_token_ids=bool(req.return_token_ids),
        mm_inputs=mm_inputs,
        echo=_echo_text(req),
    )


async def plan_chat_async(state: Any, req: ChatCompletionRequest) -> ChatRun:
    """`plan_chat`, in a worker thread when the messages carry images or videos (decoding and resizing are heavy)."""
    images, videos = collect_media(req.messages)
    if images or videos:
        return await asyncio.to_thread(plan_chat, state, req)
    return plan_chat(state, req)


def _echo_text(req: ChatCompletionRequest) -> str:
    """With `echo`, the final message is repeated in front of the answer when it is the assistant's own."""
    if not req.echo or not req.messages or req.messages[-1].role != "assistant":
        return ""
    content = req.messages[-1].content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content or ""


def _engine_streams(state: Any, run: ChatRun) -> list[AsyncIterator[TextDelta]]:
    pairs = zip(run.engine_ids, run.params, strict=True)
    return [state.generation.stream(rid, run.prompt_ids, p, run.ticket, run.mm_inputs) for rid, p in pairs]


def _logprobs_block(state: Any, entries: list[TokenLogprob]) -> dict[str, Any]:
    return {"content": chat_logprobs_content(entries, state.token_text, state.tokenizer.token_bytes)}


def parse_full_output(plan: ChatPlan, text: str) -> tuple[str | None, str | None, list[dict[str, Any]]]:
    """(reasoning, content, OpenAI tool_calls) of a finished choice, with the one-shot parsers."""
    from fp4serve.parsers import parse_chat_output, parse_tool_calls

    text = plan.rendered.forced_prefix + text
    if plan.reasoning:
        out = parse_chat_output(text, plan.tools, thinking=plan.rendered.thinking)
        reasoning, content, calls = out.reasoning, out.content, out.tool_calls
    elif plan.tools is not None:
        reasoning = None
        content, found = parse_tool_calls(text, plan.tools)
        calls = [tool_call_item(f"call_{secrets.token_hex(12)}", c["name"], c["arguments"]) for c in found]
    else:
        reasoning, content, calls = None, text, []
    if plan.named is not None:
        calls = [call for call in calls if call["function"]["name"] == plan.named]
    if not plan.parallel_tool_calls:
        calls = calls[:1]
    if not plan.include_reasoning:
        reasoning = None
    return reasoning, content, calls


async def full_chat(state: Any, run: ChatRun) -> dict[str, Any]:
    texts = [""] * len(run.params)
    logprobs: list[list[TokenLogprob]] = [[] for _ in run.params]
    token_ids: list[list[int]] = [[] for _ in run.params]
    finals: list[TextDelta | None] = [None] * len(run.params)
    async with aclosing(merge(_engine_streams(state, run))) as merged:
        async for index, delta in merged:
            texts[index] += delta.text
            logprobs[index] += delta.logprobs
            token_ids[index] += delta.token_ids
            if delta.finish_reason is not None:
                finals[index] = delta
    choices = []
    completion_tokens = 0
    for index, (text, final) in enumerate(zip(texts, finals, strict=True)):
        assert final is not None
        if final.finish_reason == "abort":
            raise APIError("the request was aborted", 500, "InternalServerError")
        completion_tokens += final.num_output_tokens
        reasoning, content, calls = parse_full_output(run.plan, text)
        if run.echo:
            content = run.echo + (content or "")
        message = chat_message(content, reasoning, calls)
        block = _logprobs_block(state, logprobs[index]) if run.top_logprobs is not None else None
        reason = run.plan.finish_reason(final.finish_reason, bool(calls))
        ids = token_ids[index] if run.return_token_ids else None
        choices.append(chat_choice(index, message, block, reason, final.stop_reason, ids))
    prompt_ids = run.prompt_ids if run.return_token_ids else None
    body_usage = usage(len(run.prompt_ids), completion_tokens)
    return chat_completion(run.request_id, run.created, run.model, choices, body_usage, prompt_ids)


class _ChoiceStream:
    """Per-choice streaming state: the parser, logprobs not yet sent, and whether a tool call went out."""

    def __init__(self, state: Any, run: ChatRun, index: int):
        self.state, self.run, self.index = state, run, index
        plan = run.plan
        self.parser = None
        if plan.reasoning or plan.tools is not None:
            from fp4serve.parsers import ChatStreamParser

            self.parser = ChatStreamParser(tools=plan.tools, thinking=plan.reasoning and plan.rendered.thinking)
        self.pending_logprobs: list[TokenLogprob] = []
        self.called = False
        self.completion_tokens = 0
        self.prefix_fed = False

    def _filter(self, fragment: dict[str, Any]) -> dict[str, Any] | None:
        plan = self.run.plan
        if not plan.include_reasoning:
            fragment = {k: v for k, v in fragment.items() if k not in REASONING_KEYS}
        if "tool_calls" in fragment and not plan.parallel_tool_calls:
            calls = [c for c in fragment["tool_calls"] if c.get("index", 0) == 0]
            fragment = {k: v for k, v in fragment.items() if k != "tool_calls"} | (
                {"tool_calls": calls} if calls else {}
            )
        if "tool_calls" in fragment:
            self.called = True
        return fragment or None

    def fragments(self, text: str, final: bool) -> list[dict[str, Any]]:
        if self.parser is None:
            out = [{"content": text}] if text else []
            return out + ([{}] if final else [])
        if not self.prefix_fed:
            self.prefix_fed = True
            text = self.run.plan.rendered.forced_prefix + text
        out = self.parser.feed(text) if text else []
        if final:
            out = out + self.parser.finish()
        return [f for f in (self._filter(frag) for frag in out) if f is not None]

    def choice(self, delta: dict[str, Any], logprobs: bool, finish: TextDelta | None) -> dict[str, Any]:
        entries, self.pending_logprobs = self.pending_logprobs, []
        block = _logprobs_block(self.state, entries) if logprobs else None
        item: dict[str, Any] = {"index": self.index, "delta": delta, "logprobs": block}
        if finish is None:
            item["finish_reason"] = None
        else:
            item["finish_reason"] = self.run.plan.finish_reason(finish.finish_reason, self.called)
            item["stop_reason"] = finish.stop_reason
        item["token_ids"] = None
        return item


async def stream_chat(state: Any, run: ChatRun) -> AsyncIterator[str]:
    prompt_tokens = len(run.prompt_ids)
    states = [_ChoiceStream(state, run, i) for i in range(len(run.params))]
    want_logprobs = run.top_logprobs is not None

    def chunk(choices: list[dict[str, Any]], choice_state: _ChoiceStream | None = None, **extra: Any) -> str:
        if run.continuous_usage and choice_state is not None:
            extra["usage"] = stream_usage(prompt_tokens, choice_state.completion_tokens)
        return sse(chat_chunk(run.request_id, run.created, run.model, choices, **extra))

    try:
        for cs in states:
            first = {
                "index": cs.index,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
            yield chunk([first], cs, prompt_token_ids=None)
            if run.echo:
                yield chunk([cs.choice({"content": run.echo}, False, None)], cs)
        async with aclosing(merge(_engine_streams(state, run))) as merged:
            async for index, delta in merged:
                cs = states[index]
                cs.completion_tokens = delta.num_output_tokens
                cs.pending_logprobs += delta.logprobs
                final = delta.finish_reason is not None
                if final and delta.finish_reason == "abort":
                    raise APIError("the request was aborted", 500, "InternalServerError")
                fragments = cs.fragments(delta.text, final)
                if final:
                    last = fragments.pop() if fragments else {}
                    for fragment in fragments:
                        yield chunk([cs.choice(fragment, want_logprobs, None)], cs)
                    yield chunk([cs.choice(last, want_logprobs, delta)], cs)
                else:
                    for fragment in fragments:
                        yield chunk([cs.choice(fragment, want_logprobs, None)], cs)
        if run.include_usage:
            total = sum(cs.completion_tokens for cs in states)
            yield sse(chat_chunk(run.request_id, run.created, run.model, [], usage=stream_usage(prompt_tokens, total)))
    except APIError as exc:
        yield sse(error_body(exc.message, exc.status, exc.err_type, exc.param))
    except Exception as exc:
        state.log_exception(exc)
        yield sse(error_body("Internal server error", 500))
    yield SSE_DONE

"""`POST /v1/completions`: raw prompts (text or token ids, one or many), no template and no parsers.

Choice indexes run prompt by prompt: prompt `p`'s `i`-th sample is choice `p * n + i`, as in vLLM. `max_tokens`
defaults to 16 here (the OpenAI legacy default), unlike chat.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from fp4serve.server.errors import APIError, bad_request, error_body
from fp4serve.server.generation import TextDelta, Ticket
from fp4serve.server.params import check_n, check_unsupported, sampling_params, token_budget, usage_flags
from fp4serve.server.protocol import CompletionRequest
from fp4serve.server.responses import (
    SSE_DONE,
    TokenLogprob,
    completion,
    completion_choice,
    completion_chunk,
    completion_logprobs,
    now,
    sse,
    stream_usage,
    usage,
)
from fp4serve.server.streaming import merge


@dataclass
class CompletionRun:
    request_id: str
    created: int
    model: str
    prompts: list[list[int]]
    prompt_texts: list[str]
    params: list[Any]  # one per choice
    n: int
    logprobs: int | None
    echo: bool
    include_usage: bool
    continuous_usage: bool
    engine_ids: list[str] = field(default_factory=list)
    ticket: Ticket | None = None
    return_token_ids: bool = False

    def prompt_of(self, choice: int) -> int:
        return choice // self.n


def plan_completion(state: Any, req: CompletionRequest) -> CompletionRun:
    settings = state.settings
    state.check_model(req.model)
    check_unsupported(req)
    n = check_n(req.n)
    if req.logprobs is not None and req.logprobs > settings.max_logprobs:
        raise bad_request(
            f"Requested logprobs of {req.logprobs}, which is greater than max allowed: {settings.max_logprobs}",
            param="logprobs",
        )
    if req.echo and req.logprobs is not None:
        raise bad_request(
            "echo together with logprobs (prompt logprobs) is not supported by fp4serve yet", param="echo"
        )
    prompts: list[list[int]] = []
    texts: list[str] = []
    for index, prompt in enumerate(req.prompts()):
        if isinstance(prompt, str):
            ids = state.tokenizer.encode(prompt, add_special_tokens=req.add_special_tokens)
            texts.append(prompt)
        else:
            ids = [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < state.vocab_size]
            if bad:
                raise bad_request(
                    f"prompt[{index}]: token id {bad[0]} is out of vocabulary (size {state.vocab_size})", param="prompt"
                )
            texts.append(state.tokenizer.decode(ids, skip_special_tokens=False))
        if req.truncate_prompt_tokens is not None and req.truncate_prompt_tokens >= 0:
            ids = ids[-req.truncate_prompt_tokens :] if req.truncate_prompt_tokens else []
        if not ids:
            raise bad_request("prompt must contain at least one token", param="prompt")
        prompts.append(ids)
    params: list[Any] = []
    for ids in prompts:
        budget = token_budget(
            len(ids), req.max_tokens, state.max_model_len, state.generation_config.get("max_new_tokens")
        )
        params += [
            sampling_params(
                req,
                max_tokens=budget,
                logprobs=req.logprobs,
                generation_config=state.generation_config,
                tokenizer=state.tokenizer,
                vocab_size=state.vocab_size,
                choice_index=i,
            )
            for i in range(n)
        ]
    include_usage, continuous = usage_flags(req.stream, req.stream_options, settings.enable_force_include_usage)
    return CompletionRun(
        request_id=f"cmpl-{state.request_id(req.request_id)}",
        created=now(),
        model=settings.model_name,
        prompts=prompts,
        prompt_texts=texts,
        params=params,
        n=n,
        logprobs=req.logprobs,
        echo=req.echo,
        include_usage=include_usage,
        continuous_usage=continuous,
        engine_ids=[f"{secrets.token_hex(8)}-{i}" for i in range(len(params))],
        return_token_ids=bool(req.return_token_ids),
    )


def _streams(state: Any, run: CompletionRun) -> list[AsyncIterator[TextDelta]]:
    pairs = enumerate(zip(run.engine_ids, run.params, strict=True))
    return [state.generation.stream(rid, run.prompts[run.prompt_of(i)], p, run.ticket) for i, (rid, p) in pairs]


def _prompt_tokens(run: CompletionRun) -> int:
    return sum(len(ids) for ids in run.prompts)


async def full_completion(state: Any, run: CompletionRun) -> dict[str, Any]:
    count = len(run.params)
    texts = [run.prompt_texts[run.prompt_of(i)] if run.echo else "" for i in range(count)]
    starts = [len(t) for t in texts]
    entries: list[list[TokenLogprob]] = [[] for _ in range(count)]
    token_ids: list[list[int]] = [[] for _ in range(count)]
    finals: list[TextDelta | None] = [None] * count
    async with aclosing(merge(_streams(state, run))) as merged:
        async for index, delta in merged:
            texts[index] += delta.text
            entries[index] += delta.logprobs
            token_ids[index] += delta.token_ids
            if delta.finish_reason is not None:
                finals[index] = delta
    choices = []
    completion_tokens = 0
    for index in range(count):
        final = finals[index]
        assert final is not None
        if final.finish_reason == "abort":
            raise APIError("the request was aborted", 500, "InternalServerError")
        completion_tokens += final.num_output_tokens
        block = (
            completion_logprobs(entries[index], state.token_text, starts[index]) if run.logprobs is not None else None
        )
        ids = (token_ids[index], run.prompts[run.prompt_of(index)]) if run.return_token_ids else (None, None)
        choices.append(completion_choice(index, texts[index], block, final.finish_reason, final.stop_reason, *ids))
    return completion(run.request_id, run.created, run.model, choices, usage(_prompt_tokens(run), completion_tokens))


async def stream_completion(state: Any, run: CompletionRun) -> AsyncIterator[str]:
    count = len(run.params)
    offsets = [0] * count
    output_tokens = [0] * count
    # logprobs of steps that produced no text yet (a character split over tokens) go out with the next text
    pending: list[list[TokenLogprob]] = [[] for _ in range(count)]

    def chunk(choice: dict[str, Any], index: int) -> str:
        extra: dict[str, Any] = {}
        if run.continuous_usage:
            extra["usage"] = stream_usage(len(run.prompts[run.prompt_of(index)]), output_tokens[index])
        return sse(completion_chunk(run.request_id, run.created, run.model, [choice], **extra))

    try:
        if run.echo:
            for index in range(count):
                text = run.prompt_texts[run.prompt_of(index)]
                offsets[index] = len(text)
                yield chunk({"index": index, "text": text, "logprobs": None, "finish_reason": None}, index)
        async with aclosing(merge(_streams(state, run))) as merged:
            async for index, delta in merged:
                output_tokens[index] = delta.num_output_tokens
                if delta.finish_reason == "abort":
                    raise APIError("the request was aborted", 500, "InternalServerError")
                pending[index] += delta.logprobs
                if not delta.text and delta.finish_reason is None:
                    continue
                block = None
                if run.logprobs is not None:
                    block = completion_logprobs(pending[index], state.token_text, offsets[index])
                pending[index] = []
                offsets[index] += len(delta.text)
                choice = {
                    "index": index,
                    "text": delta.text,
                    "logprobs": block,
                    "finish_reason": delta.finish_reason,
                    "stop_reason": delta.stop_reason,
                }
                yield chunk(choice, index)
        if run.include_usage:
            yield sse(
                completion_chunk(
                    run.request_id,
                    run.created,
                    run.model,
                    [],
                    usage=stream_usage(_prompt_tokens(run), sum(output_tokens)),
                )
            )
    except APIError as exc:
        yield sse(error_body(exc.message, exc.status, exc.err_type, exc.param))
    except Exception as exc:
        state.log_exception(exc)
        yield sse(error_body("Internal server error", 500))
    yield SSE_DONE

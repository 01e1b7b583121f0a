"""Response bodies and stream chunks, as dicts in vLLM's key order with vLLM's null fields.

Non-streaming bodies carry every field (vLLM dumps the whole model), stream chunks only the keys the server set
(vLLM dumps them with `exclude_unset`). Logprobs come in the two OpenAI shapes: chat (`content` list of
token/logprob/bytes/top_logprobs) and completions (parallel `tokens` / `token_logprobs` / `top_logprobs` /
`text_offset` lists).
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any


def random_id(prefix: str, nbytes: int = 8) -> str:
    return f"{prefix}{secrets.token_hex(nbytes)}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": None,
    }


def stream_usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
    }


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


@dataclass
class TokenLogprob:
    """One generated token's logprob and its top alternatives (id, logprob), as the engine reports them."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


def _logprob_value(value: float) -> float:
    # JSON has no -inf; vLLM clamps to the most negative float the same way
    return max(float(value), -9999.0)


def chat_logprobs_content(entries: list[TokenLogprob], token_text: Any, token_bytes: Any) -> list[dict[str, Any]]:
    out = []
    for entry in entries:
        out.append(
            {
                "token": token_text(entry.token_id),
                "logprob": _logprob_value(entry.logprob),
                "bytes": list(token_bytes(entry.token_id)),
                "top_logprobs": [
                    {"token": token_text(tid), "logprob": _logprob_value(lp), "bytes": list(token_bytes(tid))}
                    for tid, lp in entry.top
                ],
            }
        )
    return out


def completion_logprobs(entries: list[TokenLogprob], token_text: Any, start_offset: int) -> dict[str, Any]:
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    offset = start_offset
    for entry in entries:
        text = token_text(entry.token_id)
        tokens.append(text)
        token_logprobs.append(_logprob_value(entry.logprob))
        tops = {token_text(tid): _logprob_value(lp) for tid, lp in entry.top}
        top_logprobs.append(tops if entry.top else None)
        offsets.append(offset)
        offset += len(text)
    return {"text_offset": offsets, "token_logprobs": token_logprobs, "tokens": tokens, "top_logprobs": top_logprobs}


def chat_message(content: str | None, reasoning: str | None, tool_calls: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "role": "assistant",
        "content": content,
        "refusal": None,
        "annotations": None,
        "audio": None,
        "function_call": None,
        "tool_calls": tool_calls,
        "reasoning": reasoning,
        "reasoning_content": reasoning,
    }


def tool_call_item(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def chat_choice(
    index: int,
    message: dict[str, Any],
    logprobs: dict | None,
    finish_reason: str | None,
    stop_reason: int | str | None,
    token_ids: list[int] | None = None,
) -> dict[str, Any]:
    return {
        "index": index,
        "message": message,
        "logprobs": logprobs,
        "finish_reason": finish_reason,
        "stop_reason": stop_reason,
        "token_ids": token_ids,
    }


def chat_completion(
    request_id: str,
    created: int,
    model: str,
    choices: list[dict],
    usage_: dict,
    prompt_token_ids: list[int] | None = None,
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "service_tier": None,
        "system_fingerprint": None,
        "usage": usage_,
        "prompt_logprobs": None,
        "prompt_token_ids": prompt_token_ids,
        "kv_transfer_params": None,
    }


def chat_chunk(request_id: str, created: int, model: str, choices: list[dict], **extra: Any) -> dict[str, Any]:
    chunk = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": choices,
    }
    chunk.update(extra)
    return chunk


def completion_choice(
    index: int,
    text: str,
    logprobs: dict | None,
    finish_reason: str | None,
    stop_reason: int | str | None,
    token_ids: list[int] | None = None,
    prompt_token_ids: list[int] | None = None,
) -> dict[str, Any]:
    return {
        "index": index,
        "text": text,
        "logprobs": logprobs,
        "finish_reason": finish_reason,
        "stop_reason": stop_reason,
        "token_ids": token_ids,
        "prompt_logprobs": None,
        "prompt_token_ids": prompt_token_ids,
    }


def completion(request_id: str, created: int, model: str, choices: list[dict], usage_: dict) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "service_tier": None,
        "system_fingerprint": None,
        "usage": usage_,
        "kv_transfer_params": None,
    }


def completion_chunk(request_id: str, created: int, model: str, choices: list[dict], **extra: Any) -> dict[str, Any]:
    chunk = {"id": request_id, "object": "text_completion", "created": created, "model": model, "choices": choices}
    chunk.update(extra)
    return chunk

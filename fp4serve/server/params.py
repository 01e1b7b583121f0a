"""Request fields → `SamplingParams`, with vLLM's defaults and its length rules and messages.

Fields a request leaves out take the model's `generation_config.json` values (vLLM's `--generation-config auto`),
then vLLM's fallbacks. The token budget is min(requested or generation-config max_new_tokens, max_model_len −
prompt length); a prompt that cannot fit gets vLLM's exact 400 text (spec §10), so clients that parse it keep
working.
"""

from __future__ import annotations

from typing import Any

from fp4serve.server.errors import APIError, bad_request
from fp4serve.server.protocol import SamplingFields


def too_long_error(max_model_len: int, requested: int, prompt_len: int) -> APIError:
    return bad_request(
        f"This model's maximum context length is {max_model_len} tokens. However, you requested {requested} "
        f"output tokens and your prompt contains {prompt_len} input tokens, for a total of "
        f"{prompt_len + requested} tokens. Please reduce the length of the input prompt or the number of "
        f"requested output tokens.",
        param="input_tokens",
    )


def token_budget(prompt_len: int, requested: int | None, max_model_len: int, default_max_new: int | None) -> int:
    """max_tokens for the engine; raises vLLM's 400s for a prompt that does not fit."""
    if prompt_len + max(requested or 0, 0) > max_model_len:
        raise too_long_error(max_model_len, max(requested or 0, 0), prompt_len)
    budget = max_model_len - prompt_len
    if requested is not None:
        budget = min(budget, requested)
    elif default_max_new:
        budget = min(budget, default_max_new)
    if budget < 1:
        raise bad_request(f"max_tokens must be at least 1, got {budget}.", param="max_tokens")
    return budget


def check_unsupported(fields: SamplingFields) -> None:
    """Fields vLLM honours that fp4serve cannot: refuse them rather than silently ignore them."""
    if fields.use_beam_search:
        raise bad_request("use_beam_search is not supported by fp4serve", param="use_beam_search")
    if fields.prompt_logprobs:
        raise bad_request("prompt_logprobs is not supported by fp4serve yet", param="prompt_logprobs")


def _logit_bias(fields: SamplingFields) -> dict[int, float]:
    try:
        return {int(key): float(value) for key, value in (fields.logit_bias or {}).items()}
    except ValueError as exc:
        raise bad_request(f"logit_bias keys must be token ids: {exc}", param="logit_bias") from exc


def _bad_words(fields: SamplingFields, tokenizer: Any) -> list[list[int]]:
    # a word can start the text or follow a space, and BPE spells those differently: ban both spellings
    sequences: list[list[int]] = []
    for word in fields.bad_words or []:
        for spelling in (word, " " + word.lstrip()):
            ids = tokenizer.encode(spelling)
            if ids and ids not in sequences:
                sequences.append(ids)
    return sequences


def sampling_params(
    fields: SamplingFields,
    *,
    max_tokens: int,
    logprobs: int | None,
    generation_config: dict[str, Any],
    tokenizer: Any,
    vocab_size: int,
    choice_index: int = 0,
) -> Any:
    """A validated `SamplingParams` for one choice; `n` > 1 gives each choice its own seed (seed + index)."""
    from fp4serve.sampling import SamplingParams

    seed = fields.seed
    if seed is not None and choice_index:
        seed = seed + choice_index
    try:
        params = SamplingParams(
            temperature=fields.temperature,
            top_p=fields.top_p,
            top_k=fields.top_k,
            min_p=fields.min_p,
            repetition_penalty=fields.repetition_penalty,
            presence_penalty=fields.presence_penalty or 0.0,
            frequency_penalty=fields.frequency_penalty or 0.0,
            seed=seed,
            max_tokens=max_tokens,
            min_tokens=fields.min_tokens,
            stop=fields.stop_list(),
            stop_token_ids=list(fields.stop_token_ids or []),
            include_stop_str_in_output=fields.include_stop_str_in_output,
            ignore_eos=fields.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=fields.skip_special_tokens,
            allowed_token_ids=fields.allowed_token_ids,
            bad_words_token_ids=_bad_words(fields, tokenizer),
            logit_bias=_logit_bias(fields),
            n=1,
        ).with_defaults(generation_config)
        params.validate(max_logprobs=max(logprobs or 0, 0), vocab_size=vocab_size)
    except ValueError as exc:
        raise bad_request(str(exc)) from exc
    return params


def check_n(n: int | None) -> int:
    if n is None:
        return 1
    if n < 1:
        raise bad_request(f"n must be at least 1, got {n}.", param="n")
    return n


def usage_flags(stream: bool | None, options: Any, force_include_usage: bool) -> tuple[bool, bool]:
    """(usage in the final chunk, usage in every chunk) of a request, from `stream_options` and the server flag."""
    streaming = bool(stream)
    include = streaming and (force_include_usage or bool(options and options.include_usage))
    continuous = streaming and (force_include_usage or bool(options and options.continuous_usage_stats))
    return include, continuous

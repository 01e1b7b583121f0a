"""Offline generation: `LLM(path).generate(prompts, SamplingParams(...))`, the engine driven in a loop.

`LLM` loads the model and tokenizer once; `generate` submits every prompt at once (continuous batching does the
rest), steps the engine until all are done and returns one `RequestOutput` per prompt, in input order. Parameters
the request leaves unset come from the checkpoint's `generation_config.json`, then vLLM's fallbacks. A request with
`n > 1` runs as n engine requests (seed + i each) whose completions are gathered into one output, as in vLLM.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fp4serve.config import EngineConfig
from fp4serve.engine.engine import Engine, EngineStats
from fp4serve.sampling import GenerationDefaults, SamplingParams

Prompt = str | list[int] | dict[str, Any]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop", "length" or "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string, None for eos or length
    logprobs: list[Any] | None = None  # one TokenLogprobs per generated token when requested


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def finished(self) -> bool:
        return all(o.finish_reason is not None for o in self.outputs)


class LLM:
    """A model ready for offline generation. `engine_kwargs` are `EngineConfig` fields (max_num_seqs, ...)."""

    def __init__(self, model: str | Path, **engine_kwargs: Any) -> None:
        self.model_path = Path(model)
        if not self.model_path.is_dir():
            raise ValueError(f"model path {str(model)!r} is not a directory")
        self.engine = Engine.from_pretrained(self.model_path, EngineConfig.create(**engine_kwargs))
        assert self.engine.tokenizer is not None
        self.tokenizer = self.engine.tokenizer
        self.generation_defaults = GenerationDefaults.from_dir(self.model_path)
        self._ids = itertools.count()

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for one prompt or a list: strings, token-id lists, or dicts with "prompt" / "prompt_token_ids"."""
        prompt_list = _as_prompt_list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(prompt_list)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompt_list):
                raise ValueError(
                    f"got {len(params_list)} SamplingParams for {len(prompt_list)} prompts; pass one or one per prompt"
                )
        outputs: list[RequestOutput] = []
        children: dict[str, tuple[RequestOutput, int]] = {}
        try:
            for prompt, params in zip(prompt_list, params_list, strict=True):
                text, ids = self._tokenize(prompt)
                params = params.with_defaults(self.generation_defaults)
                output = RequestOutput(str(next(self._ids)), text, ids)
                outputs.append(output)
                for i in range(params.n):
                    output.outputs.append(CompletionOutput(i, "", [], None))
                    child_id = f"{output.request_id}-{i}" if params.n > 1 else output.request_id
                    self.engine.add_request(child_id, ids, params.for_choice(i) if params.n > 1 else params)
                    children[child_id] = (output, i)
            while self.engine.has_unfinished():
                for delta in self.engine.step():
                    parent, index = children[delta.request_id]
                    completion = parent.outputs[index]
                    completion.token_ids.extend(delta.new_token_ids)
                    completion.text += delta.text or ""
                    if delta.new_logprobs is not None:
                        completion.logprobs = (completion.logprobs or []) + delta.new_logprobs
                    if delta.finish_reason is not None:
                        completion.finish_reason = delta.finish_reason
                        completion.stop_reason = delta.stop_reason
        except BaseException:
            # a failed submit or an interrupt must not leave requests behind in the engine
            for child_id in children:
                self.engine.abort(child_id)
            while self.engine.has_unfinished():
                self.engine.step()
            raise
        return outputs

    def _tokenize(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
            if "prompt" in prompt:
                return prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
            raise ValueError(f"a prompt dict needs 'prompt' or 'prompt_token_ids', got keys {sorted(prompt)}")
        return None, [int(t) for t in prompt]


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str | dict):
        return [prompts]
    prompts = list(prompts)
    if not prompts:
        return []
    # a flat list of ints is one tokenized prompt; a list of lists is several
    if all(isinstance(p, int) and not isinstance(p, bool) for p in prompts):
        return [prompts]
    for p in prompts:
        if not isinstance(p, str | dict | list | tuple):
            raise ValueError(f"a prompt must be a string, a list of token ids or a dict, got {type(p).__name__}")
    return [list(p) if isinstance(p, tuple) else p for p in prompts]

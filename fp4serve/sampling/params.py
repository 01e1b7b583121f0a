"""Per-request sampling parameters and the defaults a checkpoint ships in generation_config.json.

`SamplingParams` is a frozen dataclass validated on construction with vLLM's error messages (the server returns
them as 400s). The five fields that a model's `generation_config.json` may set (temperature, top_p, top_k, min_p,
repetition_penalty) default to None, meaning "not given by the request"; `with_defaults` fills them from the
generation config and then from vLLM's fallbacks, so one object carries both what the client asked for and what
the engine runs with.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FALLBACKS: dict[str, float | int] = {
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
}
MAX_LOGPROBS = 20
# temperatures below this are greedy, as in vLLM
GREEDY_EPS = 1e-5


def _tuple_of_ints(value: Any, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        value = [value]
    try:
        ids = tuple(value)
    except TypeError:
        raise ValueError(f"{name} must be a list of integers, got {value!r}.") from None
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"{name} must contain only integers, got {list(ids)}.")
    return ids


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one request. None in the generation_config fields means "use the model's default"."""

    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    # None: until eos or the context is full (or generation_config's max_new_tokens)
    max_tokens: int | None = None
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    # None: no logprobs; k >= 0: the sampled token's logprob plus the k most likely
    logprobs: int | None = None
    skip_special_tokens: bool = True
    allowed_token_ids: tuple[int, ...] | None = None
    # token sequences that must not be generated: the last token is banned after the others
    bad_words_token_ids: tuple[tuple[int, ...], ...] = ()
    # (token id, bias added to its logit) pairs; a dict is accepted
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", _tuple_of_ints(self.stop_token_ids or (), "stop_token_ids"))
        if self.allowed_token_ids is not None:
            allowed = _tuple_of_ints(self.allowed_token_ids, "allowed_token_ids")
            object.__setattr__(self, "allowed_token_ids", allowed)
        bad = tuple(_tuple_of_ints(w, "bad_words_token_ids") for w in self.bad_words_token_ids or ())
        object.__setattr__(self, "bad_words_token_ids", bad)
        bias = self.logit_bias.items() if isinstance(self.logit_bias, Mapping) else self.logit_bias or ()
        object.__setattr__(self, "logit_bias", tuple((int(k), float(v)) for k, v in bias))
        self.validate()

    def validate(self, *, max_logprobs: int = MAX_LOGPROBS, vocab_size: int | None = None) -> None:
        """Raise ValueError (vLLM's message) for a value out of range; `vocab_size` also checks token ids."""
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}.")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}.")
        rp, temperature = self.repetition_penalty, self.temperature
        if rp is not None and not rp > 0.0:
            raise ValueError(f"repetition_penalty must be greater than zero, got {rp}.")
        if temperature is not None and not temperature >= 0.0:
            raise ValueError(f"temperature must be non-negative, got {temperature}.")
        if temperature is not None and temperature == float("inf"):
            raise ValueError(f"temperature must be a finite number, got {temperature}.")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)):
            raise ValueError(f"top_k must be an integer, got {type(self.top_k).__name__}")
        if self.top_k is not None and self.top_k < -1:
            raise ValueError(f"top_k must be 0 (disable), or at least 1, got {self.top_k}.")
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be greater than or equal to 0, got {self.min_tokens}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, got {self.min_tokens}."
            )
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be non-negative, got {self.logprobs}.")
        if self.logprobs is not None and self.logprobs > max_logprobs:
            raise ValueError(
                f"Requested sample logprobs of {self.logprobs}, which is greater than max allowed: {max_logprobs}"
            )
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop cannot contain an empty string.")
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise ValueError("allowed_token_ids is not None and empty!")
        if any(not w for w in self.bad_words_token_ids):
            raise ValueError("bad_words cannot contain an empty token sequence.")
        if vocab_size is not None:
            self._validate_ids(vocab_size)

    def _validate_ids(self, vocab_size: int) -> None:
        checks = {
            "allowed_token_ids": self.allowed_token_ids or (),
            "logit_bias": [i for i, _ in self.logit_bias],
            "bad_words": [i for w in self.bad_words_token_ids for i in w],
        }
        for name, ids in checks.items():
            invalid = [i for i in ids if not 0 <= i < vocab_size]
            if invalid:
                raise ValueError(
                    f"token_id(s) {invalid} in {name} contain out-of-vocab token ids. Vocabulary size: {vocab_size}"
                )

    def with_defaults(self, generation_config: Mapping[str, Any] | GenerationDefaults | None = None) -> SamplingParams:
        """Fill the fields the request left out: generation_config first, then vLLM's fallbacks."""
        if isinstance(generation_config, GenerationDefaults):
            generation_config = generation_config.as_dict()
        config = generation_config or {}
        updates: dict[str, Any] = {}
        for name, fallback in FALLBACKS.items():
            if getattr(self, name) is None:
                value = config.get(name)
                updates[name] = type(fallback)(value) if value is not None else fallback
        if self.max_tokens is None and config.get("max_new_tokens") is not None:
            updates["max_tokens"] = int(config["max_new_tokens"])
        return dataclasses.replace(self, **updates) if updates else self

    def for_choice(self, index: int) -> SamplingParams:
        """Parameters of choice `index` of an n > 1 request: n = 1, and seed + index so choices differ."""
        seed = None if self.seed is None else self.seed + index
        return dataclasses.replace(self, n=1, seed=seed)

    @property
    def is_greedy(self) -> bool:
        temperature = FALLBACKS["temperature"] if self.temperature is None else self.temperature
        return temperature < GREEDY_EPS


@dataclass(frozen=True)
class GenerationDefaults:
    """The sampling defaults a checkpoint ships in `generation_config.json` (None where it says nothing)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_dir(cls, path: str | Path) -> GenerationDefaults:
        file = Path(path) / "generation_config.json"
        if not file.is_file():
            return cls()
        try:
            config = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{file} is not valid JSON: {exc}") from exc
        return cls.from_dict(config)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> GenerationDefaults:
        eos = config.get("eos_token_id")
        eos_ids = () if eos is None else _tuple_of_ints(eos, "eos_token_id")
        values: dict[str, Any] = {}
        for name in (*FALLBACKS, "max_new_tokens"):
            value = config.get(name)
            if value is not None:
                values[name] = int(value) if name in ("top_k", "max_new_tokens") else float(value)
        return cls(eos_token_ids=eos_ids, **values)

    def as_dict(self) -> dict[str, Any]:
        """The defaults that are set, under generation_config's names (no eos)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None and k != "eos_token_ids"}

"""Sampling: request parameters and their defaults, the batched sampler, and the stop rules.

`params` (SamplingParams, GenerationDefaults) is pure Python; `sampler` is the torch part; `stopping` holds the
stop-token and stop-string checks the engine runs after each step. Everything is re-exported here.
"""

from __future__ import annotations

from fp4serve.sampling.params import FALLBACKS, GREEDY_EPS, MAX_LOGPROBS, GenerationDefaults, SamplingParams
from fp4serve.sampling.sampler import Sampler, SamplerOutput, make_generator
from fp4serve.sampling.stopping import StopStringMatcher, check_stop_token, find_stop_string

__all__ = [
    "FALLBACKS",
    "GREEDY_EPS",
    "MAX_LOGPROBS",
    "GenerationDefaults",
    "Sampler",
    "SamplerOutput",
    "SamplingParams",
    "StopStringMatcher",
    "check_stop_token",
    "find_stop_string",
    "make_generator",
]

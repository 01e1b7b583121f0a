"""Runtime knobs of the engine, and the parsing of their user-facing spellings.

`EngineConfig` is one small frozen dataclass built once (from CLI flags or `LLM(**kwargs)`) and handed whole to the
engine; the scheduler, the cache planner and the runner each read only the fields they use. Sizes accept the
spellings users type on a command line ("64MiB", "2GB", "32k"), parsed here so every front end agrees. This is the
only module of the package that reads environment variables.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

AUTO_MAX_MODEL_LEN = -1

# on a CPU run without an explicit budget the cache gets this much (vLLM's CPU backend uses 4 GiB; we are smaller
# because the cache is also capped to what max_num_seqs full-length sequences could ever use)
DEFAULT_CPU_CACHE_BYTES = 1 << 30

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ki": 1 << 10,
    "kib": 1 << 10,
    "mi": 1 << 20,
    "mib": 1 << 20,
    "gi": 1 << 30,
    "gib": 1 << 30,
    "ti": 1 << 40,
    "tib": 1 << 40,
}


def parse_memory_size(value: int | float | str, *, name: str = "kv_cache_memory_bytes") -> int:
    """Bytes from an int or a string with an optional unit: "1073741824", "64MiB", "2GB", "1.5 GiB"."""
    if isinstance(value, bool):
        raise ValueError(f"{name}: expected a size in bytes, got {value!r}")
    if isinstance(value, int | float):
        size = int(value)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(f"{name}: cannot parse {value!r} as a size (examples: 1073741824, 64MiB, 2GB)")
        size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"{name}: must be positive, got {value!r}")
    return size


def parse_max_model_len(value: int | str | None) -> int | None:
    """None (the model's own context length), -1 / "auto" (largest that fits), or a length: 4096, "32k", "32K".

    As in vLLM, a lowercase k means 1000 and an uppercase K means 1024 (so "32K" is 32768).
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"max_model_len: expected a length, -1 or 'auto', got {value!r}")
    if isinstance(value, int):
        length = value
    else:
        text = str(value).strip()
        if text.lower() == "auto":
            return AUTO_MAX_MODEL_LEN
        match = re.fullmatch(r"(-?[0-9]*\.?[0-9]+)([kKmM]?)", text)
        if match is None:
            raise ValueError(f"max_model_len: cannot parse {value!r} (examples: 4096, 32k, 32K, -1, auto)")
        scale = {"": 1, "k": 1000, "K": 1024, "m": 1000**2, "M": 1024**2}[match.group(2)]
        length = int(float(match.group(1)) * scale)
    if length == AUTO_MAX_MODEL_LEN:
        return AUTO_MAX_MODEL_LEN
    if length <= 0:
        raise ValueError(f"max_model_len: must be positive, -1 or 'auto', got {value!r}")
    return length


@dataclass(frozen=True)
class EngineConfig:
    """Engine knobs. Build with `EngineConfig.create(**kwargs)` to get the user-facing spellings parsed and checked."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    block_size: int = 16
    # share of the GPU's total memory for weights + activation peak + caches (ignored on CPU)
    gpu_memory_utilization: float = 0.9
    # explicit cache budget in bytes; overrides gpu_memory_utilization, and is the budget on CPU
    kv_cache_memory_bytes: int | None = None
    # None: the model's max_position_embeddings (must fit); -1: the largest length that fits, up to that
    max_model_len: int | None = None
    enforce_eager: bool = False
    device: str = "auto"
    # "auto": bfloat16 on CUDA, float32 on CPU (the CPU path is the correctness path: fp32 GEMMs are fast there)
    dtype: str = "auto"
    # weight path of NVFP4 checkpoints: "w4a16" (dequantize weights) or "w4a4" (activation quantization emulated)
    linear_mode: str = "w4a16"
    seed: int = 0

    @classmethod
    def create(cls, **kwargs: object) -> EngineConfig:
        """Check and normalise user input (unknown keys, sizes with units, "auto" lengths) into a config."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown engine option(s) {unknown}; known: {sorted(known)}")
        if kwargs.get("kv_cache_memory_bytes") is not None:
            kwargs["kv_cache_memory_bytes"] = parse_memory_size(kwargs["kv_cache_memory_bytes"])  # type: ignore[arg-type]
        if "max_model_len" in kwargs:
            kwargs["max_model_len"] = parse_max_model_len(kwargs["max_model_len"])  # type: ignore[arg-type]
        config = cls(**kwargs)  # type: ignore[arg-type]
        config.validate()
        return config

    def validate(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization: must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ValueError(f"dtype: expected auto, bfloat16, float16 or float32, got {self.dtype!r}")
        if self.linear_mode not in ("w4a16", "w4a4"):
            raise ValueError(f"linear_mode: expected w4a16 or w4a4, got {self.linear_mode!r}")

    def resolved_device(self) -> str:
        """The torch device string: "auto" picks CUDA when present (or FP4SERVE_DEVICE when set)."""
        if self.device != "auto":
            return self.device
        forced = os.environ.get("FP4SERVE_DEVICE")
        if forced:
            return forced
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_dtype_name(self, device: str) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "float32" if device.startswith("cpu") else "bfloat16"

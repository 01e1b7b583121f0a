"""Model shapes the benchmark can build: the real Qwen3.5-27B text geometry and small ones for quick runs.

A geometry is written as the `config.json` of a `qwen3_5_text` checkpoint (a plain dict), because both consumers
read that format: `Qwen35TextConfig.from_dict` for our engine, and transformers' `Qwen3_5TextConfig(**dict)` for
the baseline. So the two models are built from literally the same numbers. Overrides (`num_layers`, `vocab_size`)
shrink a geometry for quick runs; the layer pattern (every 4th layer full attention) is recomputed for the new
depth.
"""

from __future__ import annotations

from typing import Any

from fp4serve.model.config import Qwen35TextConfig

FULL_ATTENTION_INTERVAL = 4

_BASE: dict[str, Any] = {
    "model_type": "qwen3_5_text",
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "linear_conv_kernel_dim": 4,
    "tie_word_embeddings": False,
    "attention_bias": False,
}

GEOMETRIES: dict[str, dict[str, Any]] = {
    # Qwen3.5-27B (and 3.6/3.8-27B): the text decoder of the released checkpoints
    "27b": {
        "vocab_size": 248320,
        "hidden_size": 5120,
        "intermediate_size": 17408,
        "num_hidden_layers": 64,
        "num_attention_heads": 24,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "linear_num_key_heads": 16,
        "linear_num_value_heads": 48,
        "linear_key_head_dim": 128,
        "linear_value_head_dim": 128,
        "max_position_embeddings": 262144,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000000.0,
            "partial_rotary_factor": 0.25,
            "mrope_section": [11, 11, 10],
            "mrope_interleaved": True,
        },
    },
    # the 27B's widths with 4 layers: one layer of each kind at full size, a few GB in NVFP4
    "27b-4l": {"base": "27b", "num_hidden_layers": 4},
    # small enough for a CPU test: every dimension a multiple of 16 (NVFP4 blocks), head dim 64 → rotary dim 16
    "tiny": {
        "vocab_size": 1024,
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "linear_key_head_dim": 32,
        "linear_value_head_dim": 32,
        "max_position_embeddings": 32768,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000000.0,
            "partial_rotary_factor": 0.25,
            "mrope_section": [3, 3, 2],
            "mrope_interleaved": True,
        },
    },
}


def layer_types(num_layers: int) -> list[str]:
    return [
        "full_attention" if (i + 1) % FULL_ATTENTION_INTERVAL == 0 else "linear_attention" for i in range(num_layers)
    ]


def geometry_config(name: str, *, num_layers: int | None = None, vocab_size: int | None = None) -> dict[str, Any]:
    """The `config.json` dict of geometry `name`, with optional depth / vocabulary overrides."""
    if name not in GEOMETRIES:
        raise ValueError(f"unknown geometry {name!r}; known: {sorted(GEOMETRIES)}")
    spec = dict(GEOMETRIES[name])
    base = spec.pop("base", None)
    config = {**_BASE, **(GEOMETRIES[base] if base else {}), **spec}
    if num_layers is not None:
        if num_layers <= 0:
            raise ValueError(f"--layers must be positive, got {num_layers}")
        config["num_hidden_layers"] = num_layers
    if vocab_size is not None:
        if vocab_size <= 0 or vocab_size % 16:
            raise ValueError(f"--vocab-size must be a positive multiple of 16, got {vocab_size}")
        config["vocab_size"] = vocab_size
    config["layer_types"] = layer_types(config["num_hidden_layers"])
    config["rope_parameters"] = dict(config["rope_parameters"])
    return config


def text_config(config: dict[str, Any]) -> Qwen35TextConfig:
    return Qwen35TextConfig.from_dict(config)

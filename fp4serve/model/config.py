"""Qwen3.5 text-decoder configuration, parsed once from a checkpoint's `config.json`.

Only the fields the text model uses are kept, in one frozen dataclass. Both config shapes are accepted: a
`qwen3_5_text` config (the `Qwen3_5ForCausalLM` layout) and a `qwen3_5` config whose text part sits under
`text_config` (the `Qwen3_5ForConditionalGeneration` layout). Anything that would make our model compute something
other than what the checkpoint expects (another model type, another rope type or activation) is a ValueError.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TEXT_MODEL_TYPE = "qwen3_5_text"
MULTIMODAL_MODEL_TYPE = "qwen3_5"
LAYER_TYPES = ("linear_attention", "full_attention")


@dataclass(frozen=True)
class Qwen35TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    layer_types: tuple[str, ...]
    linear_conv_kernel_dim: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_num_key_heads: int
    linear_num_value_heads: int
    rms_norm_eps: float
    rope_theta: float
    partial_rotary_factor: float
    mrope_section: tuple[int, ...]
    tie_word_embeddings: bool
    # the `model_type` of the config.json this came from (qwen3_5 = multimodal wrapper)
    source_model_type: str = TEXT_MODEL_TYPE

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def linear_key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def linear_value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def conv_dim(self) -> int:
        """Channels of the DeltaNet causal conv: q, k and v side by side."""
        return 2 * self.linear_key_dim + self.linear_value_dim

    def is_full_attention(self, layer: int) -> bool:
        return self.layer_types[layer] == "full_attention"

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> Qwen35TextConfig:
        model_type = config.get("model_type")
        if model_type == MULTIMODAL_MODEL_TYPE:
            text = config.get("text_config")
            if not isinstance(text, dict):
                raise ValueError("config.json: model_type 'qwen3_5' needs a 'text_config' object")
            # the wrapper's own flag decides tying for the multimodal class; fall back to the text config's
            tie = config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
            return _parse_text(text, tie=bool(tie), source_model_type=MULTIMODAL_MODEL_TYPE)
        if model_type == TEXT_MODEL_TYPE:
            return _parse_text(
                config, tie=bool(config.get("tie_word_embeddings", False)), source_model_type=TEXT_MODEL_TYPE
            )
        raise ValueError(
            f"config.json: model_type {model_type!r} is not supported; expected {TEXT_MODEL_TYPE!r} or "
            f"{MULTIMODAL_MODEL_TYPE!r}"
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> Qwen35TextConfig:
        return cls.from_dict(read_config_json(path))


def read_config_json(path: str | Path) -> dict[str, Any]:
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{config_path}: config.json not found")
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path}: invalid JSON ({e})") from e


def _require(config: dict[str, Any], key: str) -> Any:
    if key not in config:
        raise ValueError(f"config.json: text config lacks required key {key!r}")
    return config[key]


def _parse_text(text: dict[str, Any], *, tie: bool, source_model_type: str) -> Qwen35TextConfig:
    if text.get("model_type", TEXT_MODEL_TYPE) != TEXT_MODEL_TYPE:
        raise ValueError(f"config.json: text_config model_type {text.get('model_type')!r} is not {TEXT_MODEL_TYPE!r}")
    num_layers = int(_require(text, "num_hidden_layers"))
    layer_types = text.get("layer_types")
    if layer_types is None:
        interval = int(text.get("full_attention_interval", 4))
        layer_types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(num_layers)]
    if len(layer_types) != num_layers or any(t not in LAYER_TYPES for t in layer_types):
        raise ValueError(f"config.json: layer_types {layer_types!r} must list {num_layers} entries from {LAYER_TYPES}")
    act = text.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config.json: hidden_act {act!r} is not supported (only 'silu')")

    # transformers 5 writes `rope_parameters`; older exports put rope_theta / rope_scaling at the top level
    rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"config.json: rope_type {rope_type!r} is not supported (only 'default')")
    theta = float(rope.get("rope_theta", text.get("rope_theta", 10000.0)))
    partial = float(rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 0.25)))
    section = tuple(int(s) for s in rope.get("mrope_section", (11, 11, 10)))

    num_heads = int(_require(text, "num_attention_heads"))
    hidden = int(_require(text, "hidden_size"))
    head_dim = int(text.get("head_dim") or hidden // num_heads)
    rotary_dim = int(head_dim * partial)
    if rotary_dim <= 0 or rotary_dim % 2 or len(section) != 3:
        raise ValueError(f"config.json: rotary dim {rotary_dim} / mrope_section {list(section)} are not usable")
    cfg = Qwen35TextConfig(
        vocab_size=int(_require(text, "vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(_require(text, "intermediate_size")),
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=int(_require(text, "num_key_value_heads")),
        head_dim=head_dim,
        layer_types=tuple(layer_types),
        linear_conv_kernel_dim=int(text.get("linear_conv_kernel_dim", 4)),
        linear_key_head_dim=int(_require(text, "linear_key_head_dim")),
        linear_value_head_dim=int(_require(text, "linear_value_head_dim")),
        linear_num_key_heads=int(_require(text, "linear_num_key_heads")),
        linear_num_value_heads=int(_require(text, "linear_num_value_heads")),
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        partial_rotary_factor=partial,
        mrope_section=section,
        tie_word_embeddings=tie,
        source_model_type=source_model_type,
    )
    if cfg.num_attention_heads % cfg.num_key_value_heads or cfg.linear_num_value_heads % cfg.linear_num_key_heads:
        raise ValueError("config.json: attention heads must be a multiple of key/value heads (GQA)")
    return cfg

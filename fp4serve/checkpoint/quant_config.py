"""ModelOpt quantization config: `hf_quant_config.json` and config.json's `quantization_config`, read and written.

`QuantConfig` holds what both files say (algorithm, group size, KV-cache algorithm, excluded modules, producer).
Reading accepts either layout, preferring config.json's block as transformers and vLLM do; only NVFP4 (W4A4) and
W4A16_NVFP4 are accepted, the two algorithms vLLM's `modelopt` loader serves. Writing reproduces ModelOpt 0.47's
files key for key (../shared/docs/modelopt_reference/).

`is_excluded` matches a module name against `exclude_modules` the way vLLM's ModelOpt config does, in order:
exact (a fused name such as `qkv_proj` is excluded when its shards are; a partly excluded fused layer is an error),
then the legacy substring test (also on the name without a leading `language_model.`), then fnmatch patterns,
where `path*` also stands for `path` and `path.*` as vLLM's name mapper expands it.
`summarize_exclude_modules` compresses an exclude list into prefix wildcards the way ModelOpt's exporter does.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

from fp4serve.checkpoint.atomic import write_json_atomic

SUPPORTED_QUANT_ALGOS = ("NVFP4", "W4A16_NVFP4")
SUPPORTED_GROUP_SIZE = 16
HF_QUANT_CONFIG = "hf_quant_config.json"
CONFIG = "config.json"
DEFAULT_PRODUCER = {"name": "modelopt", "version": "0.47.0"}

# fused module name -> the checkpoint modules it is made of (vLLM's packed_modules_mapping for Qwen3.5)
FUSED_SHARDS: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "in_proj_qkvz": ("in_proj_qkv", "in_proj_z"),
    "in_proj_ba": ("in_proj_b", "in_proj_a"),
}


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file} is not readable JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file} does not hold a JSON object")
    return data


@dataclass(frozen=True)
class QuantConfig:
    quant_algo: str
    group_size: int = SUPPORTED_GROUP_SIZE
    kv_cache_quant_algo: str | None = None
    exclude_modules: tuple[str, ...] = ()
    producer: dict = field(default_factory=lambda: dict(DEFAULT_PRODUCER))

    def __post_init__(self) -> None:
        if self.quant_algo not in SUPPORTED_QUANT_ALGOS:
            raise ValueError(
                f"unsupported quant_algo {self.quant_algo!r}: fp4serve supports {', '.join(SUPPORTED_QUANT_ALGOS)}"
            )
        if self.group_size != SUPPORTED_GROUP_SIZE:
            raise ValueError(f"unsupported NVFP4 group_size {self.group_size}: only {SUPPORTED_GROUP_SIZE} exists")
        if isinstance(self.exclude_modules, str) or not all(isinstance(m, str) for m in self.exclude_modules):
            raise ValueError(f"exclude_modules must be a list of module names, got {self.exclude_modules!r}")
        object.__setattr__(self, "exclude_modules", tuple(self.exclude_modules))

    @property
    def has_input_scales(self) -> bool:
        """NVFP4 checkpoints carry a static activation scale per Linear; W4A16_NVFP4 ones do not."""
        return self.quant_algo == "NVFP4"

    @classmethod
    def from_checkpoint_dir(cls, path: str | Path) -> QuantConfig | None:
        """The checkpoint's quantization config, or None for an unquantized checkpoint."""
        path = Path(path)
        config_file = path / CONFIG
        if config_file.is_file():
            block = _read_json(config_file).get("quantization_config")
            if block is not None:
                return cls.from_config_block(block, source=str(config_file))
        hf_file = path / HF_QUANT_CONFIG
        if hf_file.is_file():
            return cls.from_hf_quant_config(_read_json(hf_file), source=str(hf_file))
        return None

    @classmethod
    def from_hf_quant_config(cls, data: Mapping, *, source: str = HF_QUANT_CONFIG) -> QuantConfig:
        """Parse the `hf_quant_config.json` layout: {"producer": ..., "quantization": {...}}."""
        quant = data.get("quantization")
        if not isinstance(quant, Mapping) or "quant_algo" not in quant:
            raise ValueError(f"{source}: no 'quantization.quant_algo' entry")
        return cls._build(
            source,
            quant_algo=quant["quant_algo"],
            group_size=quant.get("group_size", SUPPORTED_GROUP_SIZE),
            kv_cache_quant_algo=quant.get("kv_cache_quant_algo"),
            exclude_modules=quant.get("exclude_modules") or [],
            producer=data.get("producer") or {},
        )

    @classmethod
    def from_config_block(cls, block: Mapping, *, source: str = CONFIG) -> QuantConfig:
        """Parse config.json's `quantization_config` (the compressed-tensors-shaped block ModelOpt writes)."""
        if not isinstance(block, Mapping):
            raise ValueError(f"{source}: quantization_config is not an object")
        method = block.get("quant_method")
        if method != "modelopt":
            raise ValueError(
                f"{source}: quantization_config has quant_method {method!r}; fp4serve loads ModelOpt checkpoints "
                f"(quant_method 'modelopt' with quant_algo {' or '.join(SUPPORTED_QUANT_ALGOS)})"
            )
        if "quant_algo" not in block:
            raise ValueError(f"{source}: quantization_config has no quant_algo")
        group_size = SUPPORTED_GROUP_SIZE
        groups = block.get("config_groups")
        if isinstance(groups, Mapping):
            for group in groups.values():
                weights = group.get("weights") if isinstance(group, Mapping) else None
                if isinstance(weights, Mapping) and "group_size" in weights:
                    group_size = weights["group_size"]
        kv = block.get("kv_cache_scheme")
        if isinstance(kv, Mapping):
            kv = "FP8" if kv.get("num_bits") == 8 and kv.get("type") == "float" else json.dumps(kv)
        return cls._build(
            source,
            quant_algo=block["quant_algo"],
            group_size=group_size,
            kv_cache_quant_algo=kv,
            exclude_modules=block.get("ignore") or [],
            producer=block.get("producer") or {},
        )

    @classmethod
    def _build(cls, source: str, **fields: object) -> QuantConfig:
        try:
            return cls(**fields)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    def is_excluded(self, module_name: str, fused_shards: Mapping[str, Iterable[str]] = FUSED_SHARDS) -> bool:
        """Whether the module stays unquantized (vLLM's order: exact with fused shards, substring, fnmatch)."""
        excluded = set(self.exclude_modules)
        parent, _, leaf = module_name.rpartition(".")
        if leaf in fused_shards:
            shards = [f"{parent}.{s}" if parent else s for s in fused_shards[leaf]]
            hit = [s for s in shards if s in excluded]
            if hit and len(hit) < len(shards):
                raise ValueError(
                    f"exclude_modules lists some but not all shards of fused module {module_name}: {hit} excluded, "
                    f"{[s for s in shards if s not in excluded]} quantized; a fused layer needs one format"
                )
            if hit:
                return True
        elif module_name in excluded:
            return True
        # vLLM also tries the name without a leading "language_model."; a substring of that is one of the full name
        if any(entry in module_name for entry in self.exclude_modules):
            return True
        return any(fnmatchcase(module_name, pattern) for pattern in _expand_patterns(self.exclude_modules))

    def to_hf_quant_config(self) -> dict:
        """The `hf_quant_config.json` content, key for key as ModelOpt writes it."""
        return {
            "producer": dict(self.producer),
            "quantization": {
                "quant_algo": self.quant_algo,
                "kv_cache_quant_algo": self.kv_cache_quant_algo,
                "group_size": self.group_size,
                "exclude_modules": list(self.exclude_modules),
            },
        }

    def to_config_quantization_block(self) -> dict:
        """config.json's `quantization_config`, as ModelOpt's `convert_hf_quant_config_format` builds it."""
        fp4 = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": self.group_size}
        group: dict = {"input_activations": dict(fp4)} if self.quant_algo == "NVFP4" else {}
        group |= {"weights": dict(fp4), "targets": ["Linear"]}
        block: dict = {"config_groups": {"group_0": group}, "ignore": list(self.exclude_modules)}
        block["quant_algo"] = self.quant_algo
        if self.kv_cache_quant_algo == "FP8":
            block["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "float"}
        elif self.kv_cache_quant_algo:
            block["kv_cache_scheme"] = self.kv_cache_quant_algo
        if self.producer:
            block["producer"] = dict(self.producer)
        block["quant_method"] = "modelopt"
        return block

    def write(self, path: str | Path) -> None:
        """Write `hf_quant_config.json` and set `quantization_config` in the existing config.json, atomically."""
        path = Path(path)
        write_json_atomic(path / HF_QUANT_CONFIG, self.to_hf_quant_config(), indent=4)
        config_file = path / CONFIG
        config = _read_json(config_file) if config_file.is_file() else {}
        config["quantization_config"] = self.to_config_quantization_block()
        write_json_atomic(config_file, config, indent=4)


def _expand_patterns(entries: Iterable[str]) -> list[str]:
    """Each entry, plus `path` and `path.*` for every `path*` whose star does not follow a dot."""
    patterns: list[str] = []
    for entry in entries:
        patterns.append(entry)
        if entry.endswith("*") and len(entry) > 1 and entry[-2] != ".":
            patterns += [entry[:-1], entry[:-1] + ".*"]
    return patterns


def summarize_exclude_modules(unquantized: Iterable[str], quantized: Iterable[str]) -> list[str]:
    """Compress unquantized module names into prefix wildcards that match no quantized module (ModelOpt 0.47).

    For each unquantized name, try cut points at each dot from the left: first `prefix*`, then the pair
    {`prefix`, `prefix.*`} (written as just `prefix.*`); fall back to the exact name. A candidate is rejected
    when it would also match a quantized module. The result is the sorted union of the chosen entries.
    """
    quantized = list(quantized)
    quantized_set = set(quantized)
    # every leading substring of a quantized name: a pattern "p*" matches it iff p is in here
    quantized_prefixes = {q[:i] for q in quantized for i in range(len(q) + 1)}
    chosen: set[str] = set()
    for name in unquantized:
        if name in quantized_set:
            raise ValueError(f"module {name} is listed as both quantized and unquantized")
        for i, ch in enumerate(name):
            if ch != ".":
                continue
            prefix = name[:i]
            if prefix not in quantized_prefixes:
                chosen.add(prefix + "*")
                break
            if prefix not in quantized_set and prefix + "." not in quantized_prefixes:
                chosen.add(prefix + ".*")
                break
        else:
            chosen.add(name)
    return sorted(chosen)

"""Which modules of a Qwen3.5 checkpoint become NVFP4, which stay BF16, and which share scales.

Two named policies:
- `seed`: the seed checkpoint's model card (ModelOpt 0.42): NVFP4 for the MLP (gate/up/down), all five Gated
  DeltaNet projections (in_proj_qkv, in_proj_z, in_proj_a, in_proj_b, out_proj) and q/k/v/o.
- `default`: nvidia-modelopt 0.47's `NVFP4_DEFAULT_CFG`, which also keeps in_proj_a/in_proj_b in BF16.
Everything else stays BF16: lm_head, conv1d, A_log, dt_bias, the norms, `mtp.*` and the whole vision tower
(excluded as `model.visual*`). The token embedding stays BF16 unless `quantize_embedding` is set (vLLM reads such a
checkpoint with `nvfp4_embed: true`). User `--exclude` patterns (fnmatch on checkpoint module names) add to either.

Modules reading the same input tensor form one input group (q/k/v, gate/up, in_proj_qkv/z[/a/b]); the exporter
gives a group one `input_scale` and one `weight_scale_2`, the maximum over its members, as ModelOpt does, so a
loader can fuse the group. vLLM fuses q/k/v, gate/up, in_proj_qkv+z and in_proj_b+a; excluding part of one of those
would leave a fused layer with two formats, so that is an error.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase

RECIPES = ("seed", "default")

ATTENTION_LEAVES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LEAVES = ("gate_proj", "up_proj", "down_proj")
DELTANET_LEAVES = ("in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj")
SMALL_DELTANET_LEAVES = ("in_proj_a", "in_proj_b")

# leaves of one parent module that read the same input tensor
INPUT_GROUPS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b"),
)
# leaves a vLLM-style loader fuses into one layer: all quantized or all BF16
FUSED_LEAVES: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("in_proj_qkv", "in_proj_z"),
    ("in_proj_a", "in_proj_b"),
)


@dataclass(frozen=True)
class QuantRecipe:
    """A quantization policy: a named recipe, optional NVFP4 embedding, and extra exclusion patterns."""

    name: str
    quantize_embedding: bool = False
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.name not in RECIPES:
            raise ValueError(f"unknown recipe {self.name!r}: choose one of {', '.join(RECIPES)}")
        for pattern in self.exclude:
            if not pattern or not isinstance(pattern, str):
                raise ValueError(f"--exclude patterns must be non-empty strings, got {pattern!r}")

    def _family_quantized(self, leaf: str) -> bool:
        if leaf in SMALL_DELTANET_LEAVES:
            return self.name == "seed"
        return leaf in ATTENTION_LEAVES or leaf in MLP_LEAVES or leaf in DELTANET_LEAVES

    def user_excluded(self, module: str) -> bool:
        """Whether an --exclude pattern matches the checkpoint module name (fnmatch, or the exact name)."""
        return any(module == p or fnmatchcase(module, p) for p in self.exclude)

    def quantizes_linear(self, module: str) -> bool:
        """Whether a decoder-layer Linear (checkpoint module name) becomes NVFP4 under this recipe."""
        leaf = module.rpartition(".")[2]
        return self._family_quantized(leaf) and not self.user_excluded(module)

    def quantizes_embedding(self, module: str) -> bool:
        return self.quantize_embedding and not self.user_excluded(module)


def input_groups(modules: Iterable[str]) -> list[tuple[str, ...]]:
    """Partition module names into input groups (members in INPUT_GROUPS order; singletons for the rest)."""
    modules = list(modules)
    present = set(modules)
    seen: set[str] = set()
    groups: list[tuple[str, ...]] = []
    for name in modules:
        if name in seen:
            continue
        parent, _, leaf = name.rpartition(".")
        group = next((g for g in INPUT_GROUPS if leaf in g), (leaf,))
        members = tuple(m for m in (f"{parent}.{x}" if parent else x for x in group) if m in present)
        seen.update(members)
        groups.append(members)
    return groups


def check_fused_consistency(quantized: Iterable[str], kept: Iterable[str]) -> None:
    """ValueError when a fused layer (e.g. q/k/v) would be partly NVFP4 and partly BF16."""
    quantized, kept = set(quantized), set(kept)
    for name in sorted(quantized):
        parent, _, leaf = name.rpartition(".")
        for fused in FUSED_LEAVES:
            if leaf not in fused:
                continue
            bf16 = sorted(f"{parent}.{x}" for x in fused if f"{parent}.{x}" in kept)
            if bf16:
                raise ValueError(
                    f"{name} would be NVFP4 but {', '.join(bf16)} BF16: a loader fuses "
                    f"{'/'.join(fused)} into one layer, so exclude all of them or none"
                )

"""The quantization plan of a source checkpoint, made from its config and safetensors headers before any work.

Everything that could make the run fail on bad input is checked here, up front, so a bad checkpoint or recipe
never leaves a half-done output: the config must be Qwen3.5, the checkpoint BF16/FP16/FP32 and not already
quantized, every text tensor the model needs present with the shape the config implies, and every Linear the recipe
quantizes must have in_features divisible by 16. The plan lists, per decoder layer, the Linears to quantize (grouped
by shared input) and the module names for `exclude_modules`: every unquantized module that ModelOpt would give a
quantizer (all Linears including a tied lm_head, the DeltaNet conv1d, the embedding) plus the vision tower and MTP
head, summarized with ModelOpt's prefix wildcards.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fp4serve.checkpoint.quant_config import QuantConfig, summarize_exclude_modules
from fp4serve.checkpoint.safetensors_io import CheckpointReader
from fp4serve.model.config import Qwen35TextConfig
from fp4serve.model.qwen3_5 import DecoderLayer, plain_linear_factory
from fp4serve.quant.nvfp4 import BLOCK_SIZE
from fp4serve.quant.recipe import QuantRecipe, check_fused_consistency, input_groups

MULTIMODAL_TEXT_PREFIX = "model.language_model."
TEXT_PREFIX = "model."
VISUAL_PREFIX = "model.visual."
MTP_PREFIX = "mtp."
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class LayerPlan:
    """One decoder layer: its checkpoint prefix, quantized Linears grouped by input, and all its tensors."""

    index: int
    prefix: str  # e.g. "model.layers.3." (checkpoint names = prefix + local name)
    groups: tuple[tuple[str, ...], ...]  # local Linear names, e.g. ("mlp.gate_proj", "mlp.up_proj")
    kept_linears: tuple[str, ...]  # local names of Linears that stay BF16
    tensors: tuple[str, ...]  # local names of every tensor of the layer

    @property
    def quantized(self) -> tuple[str, ...]:
        return tuple(m for g in self.groups for m in g)


@dataclass(frozen=True)
class CheckpointPlan:
    path: Path
    config: Qwen35TextConfig
    text_prefix: str
    layers: tuple[LayerPlan, ...]
    embed_name: str  # checkpoint module name of the token embedding
    quantize_embedding: bool
    norm_name: str  # final norm tensor
    passthrough: tuple[str, ...]  # non-layer tensors copied unchanged (vision, mtp, norm, lm_head, BF16 embedding)
    kept_modules: tuple[str, ...]  # every unquantized module ModelOpt would list (before summarizing)
    exclude_modules: tuple[str, ...]

    def layer_tensor(self, layer: LayerPlan, local: str) -> str:
        return layer.prefix + local


def _layer_structure(config: Qwen35TextConfig, index: int) -> tuple[dict[str, tuple[int, int]], dict[str, tuple]]:
    """(Linear local name -> (out, in), every tensor local name -> shape) of decoder layer `index`."""
    with torch.device("meta"):
        layer = DecoderLayer(config, index, plain_linear_factory(torch.bfloat16), torch.bfloat16, None)
    linears = {n: (m.out_features, m.in_features) for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    tensors = {n: tuple(t.shape) for n, t in layer.state_dict().items()}
    return linears, tensors


def _conv_modules(config: Qwen35TextConfig, index: int) -> list[str]:
    return [] if config.is_full_attention(index) else ["linear_attn.conv1d"]


def make_plan(path: str | Path, recipe: QuantRecipe) -> CheckpointPlan:
    """Check the source checkpoint against the recipe; ValueError naming the first problem found."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"model directory {path} does not exist")
    config = Qwen35TextConfig.from_dir(path)
    if QuantConfig.from_checkpoint_dir(path) is not None:
        raise ValueError(f"{path} is already quantized (it has a quantization config); quantize a BF16 checkpoint")
    reader = CheckpointReader(path)
    names = set(reader.names())
    text_prefix = MULTIMODAL_TEXT_PREFIX if any(n.startswith(MULTIMODAL_TEXT_PREFIX) for n in names) else TEXT_PREFIX

    expected: dict[str, tuple] = {}
    layers: list[LayerPlan] = []
    quantized_modules: list[str] = []
    kept_modules: list[str] = []
    for i in range(config.num_hidden_layers):
        prefix = f"{text_prefix}layers.{i}."
        linears, tensors = _layer_structure(config, i)
        expected.update({prefix + n: s for n, s in tensors.items()})
        wanted = [n for n in linears if recipe.quantizes_linear(prefix + n)]
        for n in wanted:
            in_features = linears[n][1]
            if in_features % BLOCK_SIZE:
                raise ValueError(
                    f"{prefix + n}: in_features {in_features} is not a multiple of the NVFP4 block size "
                    f"{BLOCK_SIZE}; exclude it (--exclude '{prefix + n}') or use another recipe"
                )
        kept = [n for n in linears if n not in wanted]
        check_fused_consistency([prefix + n for n in wanted], [prefix + n for n in kept])
        quantized_modules += [prefix + n for n in wanted]
        kept_modules += [prefix + n for n in kept] + [prefix + n for n in _conv_modules(config, i)]
        layers.append(LayerPlan(i, prefix, tuple(input_groups(wanted)), tuple(kept), tuple(tensors)))

    embed_name = f"{text_prefix}embed_tokens"
    norm_name = f"{text_prefix}norm.weight"
    expected[embed_name + ".weight"] = (config.vocab_size, config.hidden_size)
    expected[norm_name] = (config.hidden_size,)
    if not config.tie_word_embeddings:
        expected["lm_head.weight"] = (config.vocab_size, config.hidden_size)
    quantize_embedding = recipe.quantizes_embedding(embed_name)
    if quantize_embedding and config.hidden_size % BLOCK_SIZE:
        raise ValueError(
            f"{embed_name}: hidden size {config.hidden_size} is not a multiple of the NVFP4 block size {BLOCK_SIZE}"
        )
    (quantized_modules if quantize_embedding else kept_modules).append(embed_name)
    kept_modules.append("lm_head")

    problems = []
    missing = sorted(n for n in expected if n not in names)
    if missing:
        problems.append(f"missing tensors: {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
    for name, shape in expected.items():
        if name in names and tuple(reader.shape(name)) != shape:
            problems.append(f"{name} has shape {list(reader.shape(name))}, config.json implies {list(shape)}")
    for name in sorted(names):
        if name in expected and reader.dtype(name) not in FLOAT_DTYPES:
            problems.append(f"{name} is {reader.dtype(name)}, not a BF16/FP16/FP32 weight")
    extra = sorted(
        n
        for n in names
        if n not in expected
        and not n.startswith((VISUAL_PREFIX, MTP_PREFIX))
        and not (config.tie_word_embeddings and n == "lm_head.weight")
    )
    if extra:
        problems.append(f"unexpected tensors: {', '.join(extra[:8])}" + (" ..." if len(extra) > 8 else ""))
    if problems:
        raise ValueError(f"checkpoint {path} does not match a Qwen3.5 model: " + "; ".join(problems))

    side = sorted(n for n in names if n.startswith((VISUAL_PREFIX, MTP_PREFIX)))
    kept_modules += sorted({n.rpartition(".")[0] for n in side})
    passthrough = [*side, norm_name]
    if not config.tie_word_embeddings:
        passthrough.append("lm_head.weight")
    if not quantize_embedding:
        passthrough.append(embed_name + ".weight")
    if not quantized_modules:
        raise ValueError("the recipe and --exclude patterns leave no module to quantize")
    exclude = summarize_exclude_modules(kept_modules, quantized_modules)
    return CheckpointPlan(
        path=path,
        config=config,
        text_prefix=text_prefix,
        layers=tuple(layers),
        embed_name=embed_name,
        quantize_embedding=quantize_embedding,
        norm_name=norm_name,
        passthrough=tuple(passthrough),
        kept_modules=tuple(kept_modules),
        exclude_modules=tuple(exclude),
    )

"""Load a Qwen3.5 checkpoint directory (BF16 or ModelOpt NVFP4, either layout) into `Qwen35ForCausalLM`.

Two layouts exist: `Qwen3_5ForConditionalGeneration` (text under `model.language_model.*`, plus `model.visual.*` and
`mtp.*`) and `Qwen3_5ForCausalLM` (text under `model.*`). Our parameter names are the CausalLM ones, so the loader is
a name table: it maps each checkpoint name to ours, hands `model.visual.*` to an optional callback (the vision
tower's loader), and skips `mtp.*`. Which projections are NVFP4 is read from the checkpoint itself: a Linear is
built as `NVFP4Linear` when the quant config does not exclude it and its `weight_scale` is present.

Everything is validated from the safetensors headers before any data is read (missing, unexpected, misshaped or
wrongly typed tensors raise one ValueError naming them). The model is then built on the meta device, materialised
once on the target device, and filled shard by shard, one tensor at a time, so the checkpoint is never held in
memory next to the model.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from fp4serve.checkpoint.quant_config import QuantConfig
from fp4serve.checkpoint.safetensors_io import CheckpointReader
from fp4serve.checkpoint.validate import validate_nvfp4_tensors
from fp4serve.model.config import Qwen35TextConfig
from fp4serve.model.embedding import NVFP4Embedding
from fp4serve.model.linear import NVFP4Linear
from fp4serve.model.qwen3_5 import Qwen35ForCausalLM

MULTIMODAL_TEXT_PREFIX = "model.language_model."
TEXT_PREFIX = "model."
VISUAL_PREFIX = "model.visual."
MTP_PREFIX = "mtp."
LINEAR_MODES = ("w4a16", "w4a4")

# receives (name relative to `model.visual.`, tensor) for every vision-tower tensor
VisualLoader = Callable[[str, torch.Tensor], None]


def load_model(
    path: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    linear_mode: str = "w4a16",
    visual_loader: VisualLoader | None = None,
    progress: bool = True,
) -> Qwen35ForCausalLM:
    """Build the text model from `path` and load its weights; `model.visual.*` go to `visual_loader` if given."""
    if linear_mode not in LINEAR_MODES:
        raise ValueError(f"linear_mode {linear_mode!r} is not one of {LINEAR_MODES}")
    path = Path(path)
    config = Qwen35TextConfig.from_dir(path)
    reader = CheckpointReader(path)
    quant = QuantConfig.from_checkpoint_dir(path)
    names = reader.names()
    text_prefix = MULTIMODAL_TEXT_PREFIX if any(n.startswith(MULTIMODAL_TEXT_PREFIX) for n in names) else TEXT_PREFIX

    def checkpoint_name(ours: str) -> str:
        return text_prefix + ours[len(TEXT_PREFIX) :] if ours.startswith(TEXT_PREFIX) else ours

    def make_linear(name: str, in_features: int, out_features: int) -> nn.Module:
        ckpt = checkpoint_name(name)
        if quant is not None and not quant.is_excluded(ckpt) and f"{ckpt}.weight_scale" in reader:
            return NVFP4Linear(in_features, out_features, mode=linear_mode, dtype=dtype)
        return nn.Linear(in_features, out_features, bias=False, dtype=dtype)

    with torch.device("meta"):
        model = Qwen35ForCausalLM(config, make_linear=make_linear, dtype=dtype)
        embed = checkpoint_name("model.embed_tokens")
        if quant is not None and not quant.is_excluded(embed) and f"{embed}.weight_scale" in reader:
            # an NVFP4 token embedding (vLLM's `nvfp4_embed`), also the tied lm_head
            model.model.embed_tokens = NVFP4Embedding(config.vocab_size, config.hidden_size, dtype=dtype)
    targets = _plan(model, reader, checkpoint_name, config.tie_word_embeddings, linear_mode, visual_loader)
    model.to_empty(device=device)
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    for module in model.modules():
        if isinstance(module, NVFP4Linear):
            # 0 marks "no activation scale" (W4A16 checkpoints); overwritten where the checkpoint has one
            module.input_scale.zero_()

    bar = tqdm(total=len(targets), desc=f"Loading {path.name}", unit="tensor", disable=not progress)
    for _, shard_names in reader.shards():
        for name in shard_names:
            target = targets.get(name)
            if target is None:
                continue
            tensor = reader.get(name)
            if target == VISUAL_PREFIX:
                visual_loader(name[len(VISUAL_PREFIX) :], tensor)
            else:
                with torch.no_grad():
                    # scalar scales may be stored as [] or [1]
                    params[target].copy_(tensor.reshape(params[target].shape))
            del tensor
            bar.update(1)
    bar.close()
    return model.eval()


def _plan(
    model: Qwen35ForCausalLM,
    reader: CheckpointReader,
    checkpoint_name: Callable[[str], str],
    tied: bool,
    linear_mode: str,
    visual_loader: VisualLoader | None,
) -> dict[str, str]:
    """Check every checkpoint tensor against the model from headers only; return {checkpoint name: our name}
    (our name `VISUAL_PREFIX` marks a vision tensor for the callback). Raises one ValueError listing all problems."""
    expected = dict(model.named_parameters()) | dict(model.named_buffers())
    by_ckpt = {checkpoint_name(ours): ours for ours in expected}
    problems: list[str] = []
    # NVFP4 Linears: dtypes, shapes and scale values through the checkpoint package's validator
    nvfp4 = {}
    for ours, module in model.named_modules():
        if isinstance(module, (NVFP4Linear, NVFP4Embedding)):
            prefix = checkpoint_name(ours)
            nvfp4[prefix] = module
            # an embedding has no activation scale in any mode
            needs_input_scale = linear_mode == "w4a4" and isinstance(module, NVFP4Linear)
            try:
                validate_nvfp4_tensors(
                    prefix, reader, module.out_features, module.in_features, require_input_scale=needs_input_scale
                )
            except ValueError as e:
                problems.append(str(e))

    targets: dict[str, str] = {}
    unexpected: list[str] = []
    for name in reader.names():
        if name in by_ckpt:
            want = tuple(expected[by_ckpt[name]].shape)
            shape = tuple(reader.shape(name))
            if name.rsplit(".", 1)[0] not in nvfp4 and shape != want:
                problems.append(f"{name}: shape {list(shape)} does not match config.json (expected {list(want)})")
            targets[name] = by_ckpt[name]
        elif name.startswith(VISUAL_PREFIX):
            if visual_loader is not None:
                targets[name] = VISUAL_PREFIX
        elif not (name.startswith(MTP_PREFIX) or (tied and name == "lm_head.weight")):
            unexpected.append(name)
    # a missing NVFP4 tensor is already reported by the validator; input_scale may be absent (W4A16 checkpoints)
    missing = [ckpt for ckpt in by_ckpt if ckpt not in reader and ckpt.rsplit(".", 1)[0] not in nvfp4]
    if missing:
        problems.append(f"missing tensors: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_listing(unexpected)}")
    if problems:
        raise ValueError(f"checkpoint {reader.path} does not match the Qwen3.5 text model: " + "; ".join(problems))
    return targets


def _listing(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")

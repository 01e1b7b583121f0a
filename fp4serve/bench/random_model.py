"""A `Qwen35ForCausalLM` with random weights made directly on the target device: no checkpoint, no BF16 copy.

The model is constructed on the meta device (shapes only), given uninitialised storage on the target device with
`to_empty`, and every tensor is then filled in place by one random kernel. So a 27B model is ready in seconds and
never needs more memory than its own weights. Speed does not depend on the weight values, but NaN/Inf would make
the timings meaningless (and some kernels take other paths on them), so the values are plausible: packed bytes
uniform over all 256 code pairs, FP8 block scales uniform in [32, 448] (the upper part of E4M3's range, as ModelOpt
produces for real weights), and a global `weight_scale_2` chosen so that each dequantized weight has standard
deviation 1/sqrt(in_features), which keeps activations near unit scale through any depth. BF16 linears get the same
standard deviation from a normal draw.

Which linears are NVFP4 follows recipe A of shared/docs/perf_anchors.md §1.2 (the community checkpoints): every
big projection in NVFP4; the tiny DeltaNet gates `in_proj_a` / `in_proj_b`, the embeddings and the lm_head in BF16.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fp4serve.model.config import Qwen35TextConfig
from fp4serve.model.linear import NVFP4Linear
from fp4serve.model.qwen3_5 import GatedRMSNorm, LinearFactory, Qwen35ForCausalLM, RMSNorm
from fp4serve.quant.nvfp4 import E2M1_VALUES

QUANT_KINDS = ("nvfp4", "bf16")
# projections left unquantized in an NVFP4 model (matched on the last part of the module name)
BF16_KEPT = ("in_proj_a", "in_proj_b", "lm_head")
BLOCK_SCALE_RANGE = (32.0, 448.0)
# a typical activation amax after RMSNorm over 6 * 448, for the w4a4 emulation mode
INPUT_SCALE = 5.0 / 2688.0


def nvfp4_global_scale(in_features: int) -> float:
    """weight_scale_2 that gives dequantized weights a standard deviation of 1/sqrt(in_features)."""
    code_sq = sum(v * v for v in E2M1_VALUES) / len(E2M1_VALUES)  # E[code value^2], codes uniform
    lo, hi = BLOCK_SCALE_RANGE
    scale_sq = (hi**3 - lo**3) / (3 * (hi - lo))  # E[s^2], s uniform in [lo, hi]
    return 1.0 / math.sqrt(in_features) / math.sqrt(code_sq * scale_sq)


def linear_factory(quant: str, dtype: torch.dtype, linear_mode: str = "w4a16") -> LinearFactory:
    """NVFP4Linear for every projection but `BF16_KEPT` (`quant="nvfp4"`), or nn.Linear throughout (`"bf16"`)."""
    if quant not in QUANT_KINDS:
        raise ValueError(f"quant {quant!r} is not one of {QUANT_KINDS}")

    def make_linear(name: str, in_features: int, out_features: int) -> nn.Module:
        if quant == "nvfp4" and name.rsplit(".", 1)[-1] not in BF16_KEPT:
            return NVFP4Linear(in_features, out_features, mode=linear_mode, dtype=dtype)
        return nn.Linear(in_features, out_features, bias=False, dtype=dtype)

    return make_linear


def meta_model(
    config: Qwen35TextConfig, *, quant: str, dtype: torch.dtype, linear_mode: str = "w4a16"
) -> Qwen35ForCausalLM:
    """The model on the meta device: shapes and byte counts, no memory."""
    with torch.device("meta"):
        return Qwen35ForCausalLM(config, make_linear=linear_factory(quant, dtype, linear_mode), dtype=dtype)


def build_random_model(
    config: Qwen35TextConfig,
    *,
    quant: str,
    device: torch.device | str,
    dtype: torch.dtype,
    seed: int = 0,
    linear_mode: str = "w4a16",
) -> Qwen35ForCausalLM:
    """The text model with random weights on `device`: NVFP4 linears (`quant="nvfp4"`) or all BF16 (`"bf16"`)."""
    model = meta_model(config, quant=quant, dtype=dtype, linear_mode=linear_mode)
    model.to_empty(device=device)
    fill_random_(model, seed)
    return model.eval()


@torch.no_grad()
def fill_random_(model: nn.Module, seed: int = 0) -> None:
    """Give every parameter and buffer of the model a random value in place (see the module docstring)."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    for module in model.modules():
        tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        for leaf, t in tensors:
            if t is not None:
                _fill(module, leaf, t, gen)


def _fill(module: nn.Module, leaf: str, t: torch.Tensor, gen: torch.Generator) -> None:
    if isinstance(module, NVFP4Linear):
        if leaf == "weight":
            t.random_(0, 256, generator=gen)
        elif leaf == "weight_scale":
            scales = torch.empty(t.shape, dtype=torch.float32, device=t.device)
            t.copy_(scales.uniform_(*BLOCK_SCALE_RANGE, generator=gen))
        elif leaf == "weight_scale_2":
            t.fill_(nvfp4_global_scale(module.in_features))
        elif leaf == "input_scale":
            t.fill_(INPUT_SCALE)
        elif leaf == "bias":
            t.zero_()
        else:
            raise AssertionError(f"unexpected NVFP4Linear tensor {leaf}")
    elif isinstance(module, nn.Linear):
        t.normal_(0.0, 1.0 / math.sqrt(module.in_features), generator=gen)
    elif isinstance(module, nn.Embedding):
        t.normal_(0.0, 1.0, generator=gen)
    elif isinstance(module, nn.Conv1d):
        t.normal_(0.0, 1.0 / math.sqrt(t.shape[-1]), generator=gen)
    elif isinstance(module, RMSNorm):
        # zero-centred: the scale is 1 + weight
        t.normal_(0.0, 0.05, generator=gen)
    elif isinstance(module, GatedRMSNorm):
        t.normal_(1.0, 0.05, generator=gen)
    elif leaf == "A_log":
        t.uniform_(0.0, math.log(16.0), generator=gen)
    elif leaf == "dt_bias":
        t.normal_(1.0, 0.1, generator=gen)
    else:
        raise AssertionError(f"no random fill rule for {type(module).__name__}.{leaf}")

"""A real ModelOpt NVFP4 export of a tiny random Qwen3.5 model, read back through our reader, config and numerics.

The model is built with transformers on the CPU, calibrated with `mtq.quantize(NVFP4_DEFAULT_CFG)` and written by
`export_hf_checkpoint`, once per module. "ModelOpt's own dequantized weight" of a Linear is computed from the
quantized model itself: the global scale ModelOpt derives from that layer's weight quantizer (after the export has
synced fused groups), NVFP4QTensor.quantize of the original BF16 weight with it, and NVFP4QTensor.dequantize.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fp4serve.checkpoint.quant_config import QuantConfig
from fp4serve.checkpoint.safetensors_io import CheckpointReader
from fp4serve.checkpoint.validate import validate_nvfp4_tensors
from fp4serve.model.linear import NVFP4Linear
from fp4serve.quant.nvfp4 import (
    BLOCK_SIZE,
    dequantize_weight,
    global_scale_from_amax,
    quant_dequant_activation,
    quantize_weight,
)

# modules that read the same input; ModelOpt's export gives each group one weight_scale_2 and one input_scale
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("in_proj_qkv", "in_proj_z"))


@dataclass
class Export:
    path: Path
    ckpt_name: dict[str, str]  # HF module name -> checkpoint module name
    originals: dict[str, torch.Tensor]  # BF16 weight of every Linear before export
    quantized: set[str]  # HF names of Linears with an enabled weight quantizer
    modelopt_dequantized: dict[str, torch.Tensor]  # BF16, from the model's weight quantizers


def build_and_export(path: Path, quant_cfg: str) -> Export:
    """Build, calibrate with `mtq.<quant_cfg>` and export the tiny model into `path`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import modelopt.torch.quantization as mtq
        from modelopt.torch.export import export_hf_checkpoint
        from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor
        from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig
        from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    config = Qwen3_5TextConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        linear_num_key_heads=2,
        linear_num_value_heads=2,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        max_position_embeddings=256,
        layer_types=["linear_attention"] * 3 + ["full_attention"],
        tie_word_embeddings=True,
        architectures=["Qwen3_5ForCausalLM"],
    )
    torch.manual_seed(0)
    model = Qwen3_5ForCausalLM(config).to(torch.bfloat16).eval()
    with torch.no_grad():
        layers = model.model.layers
        # an all-zero block, an outlier that sets the group amax, and a block of tiny values
        layers[0].mlp.down_proj.weight[0, :BLOCK_SIZE] = 0
        layers[1].mlp.up_proj.weight[5, 7] = 1.5
        layers[3].self_attn.v_proj.weight[2, :BLOCK_SIZE] *= 1e-4

    def forward_loop(m: torch.nn.Module) -> None:
        g = torch.Generator().manual_seed(1)
        for _ in range(2):
            m(torch.randint(0, config.vocab_size, (1, 24), generator=g))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mtq.quantize(model, getattr(mtq, quant_cfg), forward_loop)
        linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        originals = {n: m.weight.detach().clone() for n, m in linears.items()}
        export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=path)

    quantized: set[str] = set()
    dequantized: dict[str, torch.Tensor] = {}
    for name, module in linears.items():
        quantizer = getattr(module, "weight_quantizer", None)
        if quantizer is None or not quantizer.is_enabled:
            continue
        quantized.add(name)
        scale_2 = NVFP4QTensor.get_weights_scaling_factor_2_from_quantizer(quantizer)
        qt, scale, scale_2 = NVFP4QTensor.quantize(
            originals[name].clone(), BLOCK_SIZE, weights_scaling_factor_2=scale_2
        )
        dequantized[name] = qt.dequantize(
            dtype=torch.bfloat16, scale=scale, double_scale=scale_2, block_sizes={-1: BLOCK_SIZE}
        )
    # transformers 5 saves Qwen3.5 under the multimodal layout (model.language_model.*)
    names = set(CheckpointReader(path).names())
    ckpt_name = {}
    for name in linears:
        text = name.replace("model.", "model.language_model.", 1)
        ckpt_name[name] = text if any(n.startswith(text + ".") for n in names) else name
    return Export(path, ckpt_name, originals, quantized, dequantized)


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Export:
    return build_and_export(tmp_path_factory.mktemp("modelopt_nvfp4"), "NVFP4_DEFAULT_CFG")


@pytest.fixture(scope="module")
def export_w4a16(tmp_path_factory: pytest.TempPathFactory) -> Export:
    return build_and_export(tmp_path_factory.mktemp("modelopt_w4a16"), "W4A16_NVFP4_CFG")


def test_export_loads_through_reader_and_quant_config(export: Export) -> None:
    reader = CheckpointReader(export.path)
    qc = QuantConfig.from_checkpoint_dir(export.path)
    assert qc is not None and qc.quant_algo == "NVFP4" and qc.producer["name"] == "modelopt"
    hf_quant_config = json.loads((export.path / "hf_quant_config.json").read_text())
    assert QuantConfig.from_hf_quant_config(hf_quant_config) == qc
    # what we would write is what ModelOpt wrote, key for key
    assert json.dumps(qc.to_hf_quant_config()) == json.dumps(hf_quant_config)
    block = json.loads((export.path / "config.json").read_text())["quantization_config"]
    assert json.dumps(qc.to_config_quantization_block()) == json.dumps(block)
    assert len(export.quantized) == 25
    for name, weight in export.originals.items():
        ckpt = export.ckpt_name[name]
        if name in export.quantized:
            assert not qc.is_excluded(ckpt)
            validate_nvfp4_tensors(ckpt, reader, *weight.shape, require_input_scale=True)
        else:
            # in_proj_a/in_proj_b stay BF16 and are listed; lm_head is tied (no tensor) but listed too
            assert qc.is_excluded(ckpt), ckpt
            assert f"{ckpt}.weight_scale" not in reader
    assert reader.dtype("model.language_model.layers.0.linear_attn.in_proj_a.weight") == torch.bfloat16


def test_every_quantized_linear_dequantizes_exactly_like_modelopt(export: Export) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor
    reader = CheckpointReader(export.path)
    for name in sorted(export.quantized):
        ckpt = export.ckpt_name[name]
        weight, scale, scale_2 = (reader.get(f"{ckpt}.{leaf}") for leaf in ("weight", "weight_scale", "weight_scale_2"))
        ours = dequantize_weight(weight, scale, scale_2, dtype=torch.bfloat16)
        assert torch.equal(ours.view(torch.int16), export.modelopt_dequantized[name].view(torch.int16)), name
        # the file tensors through ModelOpt's own dequantize, in fp32
        qt = NVFP4QTensor(export.originals[name].shape, torch.bfloat16, weight)
        theirs = qt.dequantize(dtype=torch.float32, scale=scale, double_scale=scale_2, block_sizes={-1: BLOCK_SIZE})
        assert torch.equal(dequantize_weight(weight, scale, scale_2).view(torch.int32), theirs.view(torch.int32))


def test_our_quantizer_reproduces_the_exported_bytes_and_fused_scales(export: Export) -> None:
    reader = CheckpointReader(export.path)
    for name in sorted(export.quantized):
        parent, _, leaf = name.rpartition(".")
        group = next((g for g in FUSED_GROUPS if leaf in g), (leaf,))
        members = [f"{parent}.{m}" for m in group]
        shared = global_scale_from_amax(torch.stack([export.originals[m].abs().amax().float() for m in members]).amax())
        ckpt = export.ckpt_name[name]
        assert torch.equal(reader.get(f"{ckpt}.weight_scale_2"), shared), name
        group_input = {float(reader.get(f"{export.ckpt_name[m]}.input_scale")) for m in members}
        assert len(group_input) == 1
        ours = quantize_weight(export.originals[name], name=name, weight_scale_2=shared)
        assert torch.equal(ours.weight, reader.get(f"{ckpt}.weight")), name
        assert torch.equal(ours.weight_scale.view(torch.uint8), reader.get(f"{ckpt}.weight_scale").view(torch.uint8))


@pytest.mark.parametrize("mode", ["w4a16", "w4a4"])
def test_nvfp4_linear_runs_the_exported_layer(export: Export, mode: str) -> None:
    reader = CheckpointReader(export.path)
    name = "model.layers.3.mlp.gate_proj"
    ckpt = export.ckpt_name[name]
    n, k = export.originals[name].shape
    layer = NVFP4Linear(k, n, mode=mode)
    layer.load_quantized(
        *(reader.get(f"{ckpt}.{leaf}") for leaf in ("weight", "weight_scale", "weight_scale_2")),
        input_scale=reader.get(f"{ckpt}.input_scale"),
    )
    x = torch.randn(4, k, dtype=torch.bfloat16)
    x_used = x if mode == "w4a16" else quant_dequant_activation(x, layer.input_scale)
    assert torch.equal(layer(x), F.linear(x_used, export.modelopt_dequantized[name]))


def test_w4a16_export_has_no_activation_scales_and_the_same_weights(export_w4a16: Export) -> None:
    reader = CheckpointReader(export_w4a16.path)
    qc = QuantConfig.from_checkpoint_dir(export_w4a16.path)
    assert qc is not None and qc.quant_algo == "W4A16_NVFP4" and not qc.has_input_scales
    hf_quant_config = json.loads((export_w4a16.path / "hf_quant_config.json").read_text())
    assert json.dumps(qc.to_hf_quant_config()) == json.dumps(hf_quant_config)
    block = json.loads((export_w4a16.path / "config.json").read_text())["quantization_config"]
    assert json.dumps(qc.to_config_quantization_block()) == json.dumps(block)
    assert not [n for n in reader.names() if n.endswith(".input_scale")]
    assert len(export_w4a16.quantized) == 25
    for name in export_w4a16.quantized:
        ckpt = export_w4a16.ckpt_name[name]
        validate_nvfp4_tensors(ckpt, reader, *export_w4a16.originals[name].shape)
        leaves = (reader.get(f"{ckpt}.{leaf}") for leaf in ("weight", "weight_scale", "weight_scale_2"))
        ours = dequantize_weight(*leaves, dtype=torch.bfloat16)
        assert torch.equal(ours.view(torch.int16), export_w4a16.modelopt_dequantized[name].view(torch.int16)), name

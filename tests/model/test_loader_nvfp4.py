"""NVFP4 loading without ModelOpt: a tiny model's projections quantized with our NVFP4 numerics, written as a
sharded ModelOpt-format checkpoint (either layout), must load as `NVFP4Linear`s exactly where the checkpoint says
and compute what a BF16 model holding the dequantized weights computes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from qwen35_harness import VOCAB, Pager, build_hf_model, rel_err
from safetensors.torch import load_file, save_file
from torch import nn

from fp4serve.checkpoint.quant_config import QuantConfig
from fp4serve.checkpoint.safetensors_io import save_checkpoint
from fp4serve.model.linear import NVFP4Linear
from fp4serve.model.loader import load_model
from fp4serve.quant.nvfp4 import dequantize_weight, input_scale_from_amax, quantize_weight

# every in_features a multiple of the NVFP4 block (16)
DIMS = dict(
    hidden_size=64, intermediate_size=96, head_dim=32, linear_key_head_dim=16, linear_value_head_dim=32,
    rope_parameters={"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.25,
                     "mrope_section": [2, 1, 1], "mrope_interleaved": True},
)  # fmt: skip
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROJECTIONS += ("in_proj_qkv", "in_proj_z", "out_proj")


def write_quantized(src: Path, dst: Path, *, with_input_scales: bool = True) -> Path:
    """Quantize every projection except the DeltaNet a/b gates (ModelOpt's default policy) into dst, 3+ shards;
    write the dequantized equivalent as a BF16-layout checkpoint into dst/../<dst>-dequantized."""
    tensors = load_file(src / "model.safetensors")
    quantized: dict[str, torch.Tensor] = {}
    dequantized: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] in PROJECTIONS and not module.startswith("model.visual."):
            q = quantize_weight(t)
            quantized |= {f"{module}.weight": q.weight, f"{module}.weight_scale": q.weight_scale}
            quantized[f"{module}.weight_scale_2"] = q.weight_scale_2
            if with_input_scales:
                quantized[f"{module}.input_scale"] = input_scale_from_amax(torch.tensor(3.0))
            dequantized[name] = dequantize_weight(q.weight, q.weight_scale, q.weight_scale_2)
        else:
            quantized[name] = dequantized[name] = t
    save_checkpoint(dst, sorted(quantized.items()), max_shard_bytes=60_000)
    shutil.copy(src / "config.json", dst / "config.json")
    algo = "NVFP4" if with_input_scales else "W4A16_NVFP4"
    QuantConfig(quant_algo=algo, exclude_modules=("lm_head", "*in_proj_a*", "*in_proj_b*", "model.visual*")).write(dst)
    reference = dst.parent / f"{dst.name}-dequantized"
    reference.mkdir()
    shutil.copy(src / "config.json", reference / "config.json")
    save_file(dequantized, reference / "model.safetensors", metadata={"format": "pt"})
    return reference


@pytest.fixture(scope="module", params=["causal", "conditional"])
def checkpoints(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp(request.param)
    build_hf_model(request.param, seed=7, **DIMS).save_pretrained(root / "bf16")
    reference = write_quantized(root / "bf16", root / "nvfp4")
    return root / "nvfp4", reference


def logits(model, ids: list[int]) -> torch.Tensor:
    pager = Pager(model, num_seqs=1, max_len=len(ids))
    return pager.logits(model, pager.batch([(0, ids, 0)], all_logits=True))


def test_nvfp4_checkpoint_matches_dequantized_bf16(checkpoints: tuple[Path, Path]) -> None:
    nvfp4_dir, reference_dir = checkpoints
    assert len(list(nvfp4_dir.glob("model-*.safetensors"))) >= 3
    model = load_model(nvfp4_dir, dtype=torch.float32, progress=False)
    attn, gdn = model.model.layers[1].self_attn, model.model.layers[0].linear_attn
    assert all(isinstance(m, NVFP4Linear) for m in (attn.q_proj, attn.o_proj, gdn.in_proj_qkv, gdn.out_proj))
    assert isinstance(gdn.in_proj_a, nn.Linear) and isinstance(model.lm_head, nn.Linear)
    reference = load_model(reference_dir, dtype=torch.float32, progress=False)
    ids = torch.randint(0, VOCAB, (80,), generator=torch.Generator().manual_seed(0)).tolist()
    ref = logits(reference, ids)
    assert rel_err(logits(model, ids), ref) < 1e-5
    # w4a4 emulation reads the input scales (an arbitrary amax of 3 here, so only "different" is checkable)
    w4a4 = load_model(nvfp4_dir, dtype=torch.float32, linear_mode="w4a4", progress=False)
    assert float(w4a4.model.layers[0].mlp.up_proj.input_scale) == pytest.approx(3.0 / 2688)
    out = logits(w4a4, ids)
    assert torch.isfinite(out).all() and rel_err(out, ref) > 1e-3


def test_w4a4_needs_input_scales(tmp_path: Path) -> None:
    build_hf_model("causal", seed=8, **DIMS).save_pretrained(tmp_path / "bf16")
    write_quantized(tmp_path / "bf16", tmp_path / "w4a16", with_input_scales=False)
    load_model(tmp_path / "w4a16", dtype=torch.float32, progress=False)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate_proj\.input_scale is missing"):
        load_model(tmp_path / "w4a16", dtype=torch.float32, linear_mode="w4a4", progress=False)


def test_excluded_module_with_quantized_tensors_is_rejected(tmp_path: Path) -> None:
    build_hf_model("causal", seed=9, **DIMS).save_pretrained(tmp_path / "bf16")
    write_quantized(tmp_path / "bf16", tmp_path / "q")
    hf_quant = json.loads((tmp_path / "q" / "hf_quant_config.json").read_text())
    hf_quant["quantization"]["exclude_modules"].append("model.layers.2.mlp.down_proj")
    (tmp_path / "q" / "hf_quant_config.json").write_text(json.dumps(hf_quant))
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    config["quantization_config"]["ignore"].append("model.layers.2.mlp.down_proj")
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model\.layers\.2\.mlp\.down_proj\.weight: shape \[64, 48\]"):
        load_model(tmp_path / "q", dtype=torch.float32, progress=False)

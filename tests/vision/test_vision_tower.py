"""The vision tower against transformers' Qwen3.5 vision model, and checkpoint loading rules."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from fp4serve.model.vision import Qwen35VisionModel, VisionConfig, load_vision_model

# two images of different sizes and one 2-temporal-patch video, in one call
GRIDS = [(1, 4, 6), (1, 6, 2), (2, 4, 4)]


def _ours_from(hf_model) -> Qwen35VisionModel:
    cfg = VisionConfig.from_dict(hf_model.config.vision_config.to_dict())
    ours = Qwen35VisionModel(cfg)
    ours.load_state_dict(hf_model.model.visual.state_dict())
    return ours.eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_features_match_transformers(hf_model):
    torch.manual_seed(1)
    rows = sum(t * h * w for t, h, w in GRIDS)
    pixels = torch.randn(rows, 1536)
    grid = torch.tensor(GRIDS)
    with torch.no_grad():
        ref = hf_model.model.get_image_features(pixels, grid).pooler_output
        ours = _ours_from(hf_model)(pixels, grid)
    ref = torch.cat(ref)
    assert ours.shape == ref.shape == (rows // 4, 48)
    assert _rel(ours, ref) < 1e-4


def test_attention_is_restricted_to_each_grid_and_slice(hf_model):
    ours = _ours_from(hf_model)
    torch.manual_seed(2)
    a, b = torch.randn(16, 1536), torch.randn(16, 1536)
    with torch.no_grad():
        alone = ours(a, [(1, 4, 4)])
        together = ours(torch.cat([a, b]), [(1, 4, 4), (1, 4, 4)])
        video = ours(torch.cat([a, b]), [(2, 4, 4)])
    # an image's features do not depend on its neighbours in the batch, nor a video slice on the next slice
    assert torch.allclose(together[:4], alone, atol=1e-5)
    assert torch.allclose(video[:4], alone, atol=1e-5)


def test_bad_grids_are_rejected(hf_model):
    ours = _ours_from(hf_model)
    with pytest.raises(ValueError, match="covers 24 patch rows"):
        ours(torch.randn(16, 1536), [(1, 4, 6)])
    with pytest.raises(ValueError, match="multiples of 2"):
        ours(torch.randn(15, 1536), [(1, 3, 5)])


def test_config_defaults_are_the_27b_tower():
    cfg = VisionConfig.from_model_config({"vision_config": {"model_type": "qwen3_5", "out_hidden_size": 5120}})
    assert (cfg.head_dim, cfg.grid_side, cfg.patch_dim, cfg.depth) == (72, 48, 1536, 27)
    with pytest.raises(ValueError, match="deepstack"):
        VisionConfig.from_dict({"deepstack_visual_indexes": [8, 16, 24]})
    with pytest.raises(ValueError, match="text-only"):
        VisionConfig.from_model_config({"model_type": "qwen3_5_text"})


def _write_checkpoint(path, hf_model, tensors: dict[str, torch.Tensor]) -> None:
    path.mkdir()
    (path / "config.json").write_text(json.dumps(hf_model.config.to_dict()))
    save_file(tensors, str(path / "model.safetensors"))


def test_load_bf16_tower_from_checkpoint(hf_model, tmp_path):
    state = hf_model.model.visual.state_dict()
    visual = {f"model.visual.{k}": v.to(torch.bfloat16).contiguous() for k, v in state.items()}
    text = {"model.language_model.norm.weight": torch.zeros(48, dtype=torch.bfloat16)}
    _write_checkpoint(tmp_path / "ckpt", hf_model, {**visual, **text})
    model = load_vision_model(tmp_path / "ckpt")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    torch.manual_seed(3)
    pixels = torch.randn(sum(t * h * w for t, h, w in GRIDS), 1536)
    with torch.no_grad():
        ours = model.float()(pixels, GRIDS)
        ref = torch.cat(hf_model.model.get_image_features(pixels, torch.tensor(GRIDS)).pooler_output)
    # weights were rounded to bf16 on the way, so only bf16-level agreement is expected
    assert _rel(ours, ref) < 3e-2


def test_quantized_vision_tensors_are_rejected(hf_model, tmp_path):
    visual = {f"model.visual.{k}": v.contiguous() for k, v in hf_model.model.visual.state_dict().items()}
    name = "model.visual.blocks.0.attn.qkv.weight"
    visual[name] = torch.zeros(192, 32, dtype=torch.uint8)
    visual["model.visual.blocks.0.attn.qkv.weight_scale"] = torch.ones(192, 4)
    _write_checkpoint(tmp_path / "ckpt", hf_model, visual)
    with pytest.raises(ValueError, match="must stay BF16"):
        load_vision_model(tmp_path / "ckpt")


def test_missing_or_misshaped_tensors_are_rejected(hf_model, tmp_path):
    visual = {f"model.visual.{k}": v.contiguous() for k, v in hf_model.model.visual.state_dict().items()}
    del visual["model.visual.merger.norm.bias"]
    _write_checkpoint(tmp_path / "a", hf_model, visual)
    with pytest.raises(ValueError, match="merger.norm.bias"):
        load_vision_model(tmp_path / "a")
    visual["model.visual.merger.norm.bias"] = torch.zeros(65)
    _write_checkpoint(tmp_path / "b", hf_model, visual)
    with pytest.raises(ValueError, match=r"shape \[65\]"):
        load_vision_model(tmp_path / "b")
    _write_checkpoint(tmp_path / "c", hf_model, {"model.language_model.norm.weight": torch.zeros(48)})
    with pytest.raises(ValueError, match="no model.visual"):
        load_vision_model(tmp_path / "c")

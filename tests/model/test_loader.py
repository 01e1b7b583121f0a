"""Loader: either checkpoint layout, the vision-tensor hook, and ValueErrors that name the offending tensor/key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from qwen35_harness import build_hf_model
from safetensors.torch import load_file, save_file

from fp4serve.model.loader import load_model


@pytest.fixture(scope="module")
def saved_causal(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("causal")
    build_hf_model("causal", seed=5).save_pretrained(path)
    return path


def edited_copy(src: Path, dst: Path, edit_tensors=None, edit_config=None) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    config = json.loads((src / "config.json").read_text())
    if edit_config:
        edit_config(config)
    (dst / "config.json").write_text(json.dumps(config))
    tensors = load_file(src / "model.safetensors")
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_loads_every_tensor_exactly(saved_causal: Path) -> None:
    model = load_model(saved_causal, dtype=torch.float32, progress=False)
    tensors = load_file(saved_causal / "model.safetensors")
    ours = model.state_dict()
    assert set(ours) == set(tensors)
    for name, t in tensors.items():
        assert torch.equal(ours[name], t.float()), name


def test_missing_tensor(saved_causal: Path, tmp_path: Path) -> None:
    name = "model.layers.1.self_attn.k_norm.weight"
    path = edited_copy(saved_causal, tmp_path, edit_tensors=lambda t: t.pop(name))
    with pytest.raises(ValueError, match=r"missing tensors: .*layers\.1\.self_attn\.k_norm\.weight"):
        load_model(path, progress=False)


def test_unexpected_tensor(saved_causal: Path, tmp_path: Path) -> None:
    path = edited_copy(
        saved_causal, tmp_path, edit_tensors=lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)})
    )
    with pytest.raises(ValueError, match=r"unexpected tensors: model\.layers\.0\.mlp\.extra\.weight"):
        load_model(path, progress=False)


def test_wrong_model_type(saved_causal: Path, tmp_path: Path) -> None:
    path = edited_copy(saved_causal, tmp_path, edit_config=lambda c: c.update(model_type="qwen3_next"))
    with pytest.raises(ValueError, match="model_type 'qwen3_next'"):
        load_model(path, progress=False)


def test_shape_contradicts_config(saved_causal: Path, tmp_path: Path) -> None:
    path = edited_copy(saved_causal, tmp_path, edit_config=lambda c: c.update(intermediate_size=96))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj\.weight: shape \[48, 80\]"):
        load_model(path, progress=False)


def test_bad_linear_mode(saved_causal: Path) -> None:
    with pytest.raises(ValueError, match="linear_mode"):
        load_model(saved_causal, linear_mode="w8a8", progress=False)


def test_conditional_layout_routes_visual_tensors(tmp_path: Path) -> None:
    hf = build_hf_model("conditional", seed=6)
    hf.save_pretrained(tmp_path)
    seen: dict[str, torch.Tensor] = {}
    model = load_model(tmp_path, dtype=torch.float32, progress=False, visual_loader=seen.__setitem__)
    visual = {n[len("model.visual.") :]: t for n, t in hf.state_dict().items() if n.startswith("model.visual.")}
    assert set(seen) == set(visual) and len(seen) > 5
    assert all(torch.equal(seen[n], visual[n]) for n in visual)
    ref = hf.model.language_model.layers[1].self_attn.q_proj.weight
    assert torch.equal(model.model.layers[1].self_attn.q_proj.weight, ref)
    # without a callback the vision tower is skipped silently
    load_model(tmp_path, dtype=torch.float32, progress=False)

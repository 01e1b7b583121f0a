"""`fp4serve quantize` through the real CLI on tiny random Qwen3.5 checkpoints: recipes, metadata, fused scales,
atomic output, and clear errors (exit code 2, nothing written) for bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny_model, write_text

import fp4serve.quant.pipeline as pipeline
from fp4serve.checkpoint.quant_config import QuantConfig
from fp4serve.checkpoint.safetensors_io import CheckpointReader
from fp4serve.checkpoint.validate import validate_nvfp4_tensors
from fp4serve.cli import main
from fp4serve.quant.nvfp4 import dequantize_weight

SEED_FAMILIES = {
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    "in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj",
}  # fmt: skip
FUSED = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b"),
)


@pytest.fixture(scope="module")
def calib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_text(tmp_path_factory.mktemp("calib") / "calib.txt", 3000)


@pytest.fixture(scope="module")
def conditional(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("conditional"), "conditional", seed=1)


@pytest.fixture(scope="module")
def causal(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("causal"), "causal", seed=2, tie_word_embeddings=False)


def quantize(model: Path, out: Path, calib: Path, *extra: str) -> int:
    args = ["quantize", str(model), "--output", str(out), "--calib-data", str(calib)]
    return main([*args, "--calib-samples", "4", "--calib-seq-len", "64", "--no-progress", *extra])


def quantized_modules(path: Path) -> set[str]:
    return {n.removesuffix(".weight_scale") for n in CheckpointReader(path).names() if n.endswith(".weight_scale")}


def test_seed_recipe_quantizes_exactly_the_card_families(conditional: Path, calib: Path, tmp_path: Path) -> None:
    out = tmp_path / "seed"
    assert quantize(conditional, out, calib, "--recipe", "seed") == 0
    reader = CheckpointReader(out)
    modules = quantized_modules(out)
    layers = 4
    # every decoder layer: MLP + (five DeltaNet projections | q/k/v/o); nothing else, nothing in the vision tower
    assert len(modules) == layers * 3 + 3 * 5 + 1 * 4
    assert {m.rpartition(".")[2] for m in modules} == SEED_FAMILIES
    assert all(m.startswith("model.language_model.layers.") for m in modules)
    source = CheckpointReader(conditional)
    for name in source.names():
        if name.startswith("model.visual.") or "conv1d" in name or "norm" in name or "embed_tokens" in name:
            assert reader.dtype(name) == torch.bfloat16 and torch.equal(reader.get(name), source.get(name)), name
    qc = QuantConfig.from_checkpoint_dir(out)
    assert qc is not None and qc.quant_algo == "NVFP4"
    assert "model.visual*" in qc.exclude_modules and "lm_head" in qc.exclude_modules
    assert "model.language_model.embed_tokens" in qc.exclude_modules
    assert qc.is_excluded("model.visual.blocks.0.attn.qkv") and qc.is_excluded("model.visual.merger.linear_fc1")
    for module in modules:
        assert not qc.is_excluded(module)
        n, k = source.shape(module + ".weight")
        validate_nvfp4_tensors(module, reader, n, k, require_input_scale=True)
    # the tokenizer and generation config come along; config.json keeps the model config and gains the block
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen3_5" and config["quantization_config"]["quant_method"] == "modelopt"


def test_default_recipe_keeps_in_proj_ab_and_fuses_scales(causal: Path, calib: Path, tmp_path: Path) -> None:
    out = tmp_path / "default"
    assert quantize(causal, out, calib, "--recipe", "default") == 0
    modules = quantized_modules(out)
    assert not any(m.endswith(("in_proj_a", "in_proj_b")) for m in modules)
    qc = QuantConfig.from_checkpoint_dir(out)
    assert qc is not None and qc.is_excluded("model.layers.0.linear_attn.in_proj_a")
    reader = CheckpointReader(out)
    source = CheckpointReader(causal)
    # untied lm_head stays BF16, byte for byte
    assert torch.equal(reader.get("lm_head.weight"), source.get("lm_head.weight"))
    for module in modules:
        parent, _, leaf = module.rpartition(".")
        group = next((g for g in FUSED if leaf in g), (leaf,))
        members = [f"{parent}.{m}" for m in group if f"{parent}.{m}" in modules]
        for scale in ("weight_scale_2", "input_scale"):
            assert len({float(reader.get(f"{m}.{scale}")) for m in members}) == 1, (module, scale)
        # group max amax / 2688, and the block holding the group max gets scale 448
        amax = max(float(source.get(f"{m}.weight").float().abs().max()) for m in members)
        assert float(reader.get(f"{module}.weight_scale_2")) == pytest.approx(amax / 2688, rel=1e-6)


@pytest.mark.parametrize("algorithm", ["mse", "gptq"])
def test_better_algorithms_keep_the_format(causal: Path, calib: Path, tmp_path: Path, algorithm: str) -> None:
    out = tmp_path / algorithm
    assert quantize(causal, out, calib, "--algorithm", algorithm) == 0
    reference = tmp_path / "max"
    assert quantize(causal, reference, calib, "--algorithm", "max") == 0
    ours, base = CheckpointReader(out), CheckpointReader(reference)
    assert ours.names() == base.names()
    for name in ours.names():
        assert ours.dtype(name) == base.dtype(name) and ours.shape(name) == base.shape(name)
        if name.endswith("weight_scale_2"):
            assert torch.equal(ours.get(name), base.get(name))
    # a different (better) rounding, close to the original weight
    module = "model.layers.0.mlp.down_proj"
    tensors = [ours.get(f"{module}.{leaf}") for leaf in ("weight", "weight_scale", "weight_scale_2")]
    original = CheckpointReader(causal).get(f"{module}.weight").float()
    deq = dequantize_weight(*tensors)
    assert not torch.equal(tensors[0], base.get(f"{module}.weight"))
    assert (deq - original).norm() / original.norm() < 0.2


def test_existing_output_refused_then_overwritten(causal: Path, calib: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert quantize(causal, out, calib) == 2
    assert "not empty" in capsys.readouterr().err and (out / "keep.txt").read_text() == "precious"
    assert quantize(causal, out, calib, "--overwrite") == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_interrupt_leaves_no_checkpoint(causal: Path, calib: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    calls = []
    real = pipeline.quantize

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "quantize", interrupted)
    assert quantize(causal, tmp_path / "out", calib) == 130
    assert "interrupted" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def expect_error(capsys, code: int, *fragments: str) -> None:
    err = capsys.readouterr().err
    assert code == 2, err
    for fragment in fragments:
        assert fragment in err, err


def test_missing_model_dir(calib: Path, tmp_path: Path, capsys) -> None:
    expect_error(capsys, quantize(tmp_path / "nope", tmp_path / "out", calib), "does not exist")
    assert not (tmp_path / "out").exists()


def test_not_a_qwen35_config(causal: Path, calib: Path, tmp_path: Path, capsys) -> None:
    model = tmp_path / "llama"
    shutil.copytree(causal, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"model_type": "llama"}))
    expect_error(capsys, quantize(model, tmp_path / "out", calib), "model_type 'llama'")
    assert not (tmp_path / "out").exists()


def test_empty_calibration_data(causal: Path, tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    expect_error(capsys, quantize(causal, tmp_path / "out", empty), "contains no text")
    (tmp_path / "records.jsonl").write_text('{"text": "a"}\n')
    expect_error(capsys, quantize(causal, tmp_path / "out", tmp_path / "records.jsonl"), "fewer than one window")
    assert not (tmp_path / "out").exists()


def test_unwritable_output(causal: Path, calib: Path, tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    expect_error(capsys, quantize(causal, blocker / "out", calib), "does not exist")
    expect_error(capsys, quantize(causal, blocker, calib), "not a directory")
    expect_error(capsys, quantize(causal, causal, calib, "--overwrite"), "overwrite the source model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_in_features_not_multiple_of_16(calib: Path, tmp_path: Path, capsys) -> None:
    model = save_tiny_model(tmp_path / "odd", "causal", intermediate_size=72)
    expect_error(capsys, quantize(model, tmp_path / "out", calib), "mlp.down_proj: in_features 72", "--exclude")
    assert not (tmp_path / "out").exists()
    # excluding the layer family the recipe wants makes it quantizable again
    assert quantize(model, tmp_path / "out", calib, "--exclude", "*.mlp.down_proj") == 0
    qc = QuantConfig.from_checkpoint_dir(tmp_path / "out")
    assert qc is not None and qc.is_excluded("model.layers.2.mlp.down_proj")


def test_partial_exclusion_of_a_fused_layer(causal: Path, calib: Path, tmp_path: Path, capsys) -> None:
    expect_error(capsys, quantize(causal, tmp_path / "out", calib, "--exclude", "*.k_proj"), "exclude all of them")
    assert not (tmp_path / "out").exists()

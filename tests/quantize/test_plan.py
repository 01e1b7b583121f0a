"""The quantization plan of the Austen fixture, from headers only: the exclude list ModelOpt 0.47 wrote for it
(shared/docs/modelopt_reference), the seed recipe's list, the NVFP4 embedding, and user exclusions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fp4serve.quant.plan import make_plan
from fp4serve.quant.recipe import QuantRecipe


@pytest.fixture(scope="module")
def fixture(shared_dir: Path) -> Path:
    return shared_dir / "fixtures" / "austen-qwen35-tiny"


def test_default_recipe_excludes_what_modelopt_excluded(fixture: Path, shared_dir: Path) -> None:
    reference = json.loads((shared_dir / "docs" / "modelopt_reference" / "hf_quant_config.json").read_text())
    plan = make_plan(fixture, QuantRecipe("default"))
    assert list(plan.exclude_modules) == reference["quantization"]["exclude_modules"]
    assert sum(len(layer.quantized) for layer in plan.layers) == 75
    # input groups: q/k/v, gate/up, in_proj_qkv/in_proj_z share an input (and so their scales)
    groups = {g for layer in plan.layers for g in layer.groups if len(g) > 1}
    assert ("linear_attn.in_proj_qkv", "linear_attn.in_proj_z") in groups
    assert ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj") in groups
    assert ("mlp.gate_proj", "mlp.up_proj") in groups


def test_seed_recipe_and_embedding(fixture: Path) -> None:
    plan = make_plan(fixture, QuantRecipe("seed", quantize_embedding=True))
    assert "model.embed_tokens" not in plan.exclude_modules and plan.quantize_embedding
    assert "model.embed_tokens.weight" not in plan.passthrough
    assert [m for m in plan.exclude_modules if "in_proj" in m] == []
    assert plan.exclude_modules[0] == "lm_head" and all(
        m.endswith("linear_attn.conv1d") for m in plan.exclude_modules[1:]
    )
    groups = {g for layer in plan.layers for g in layer.groups}
    names = ("linear_attn.in_proj_qkv", "linear_attn.in_proj_z", "linear_attn.in_proj_a", "linear_attn.in_proj_b")
    assert names in groups


def test_user_exclusion_is_summarized(fixture: Path) -> None:
    plan = make_plan(fixture, QuantRecipe("default", exclude=("model.layers.11.*",)))
    assert not plan.layers[11].quantized and plan.layers[10].quantized
    assert "model.layers.11*" in plan.exclude_modules  # ModelOpt's prefix wildcard
    with pytest.raises(ValueError, match="unknown recipe"):
        QuantRecipe("nvfp4_awq")

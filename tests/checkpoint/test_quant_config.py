"""QuantConfig: both ModelOpt file layouts, vLLM's exclusion matching, ModelOpt's exclude-list summarizer."""

from __future__ import annotations

import json
import random
import warnings
from fnmatch import fnmatchcase
from pathlib import Path

import pytest

from fp4serve.checkpoint.quant_config import QuantConfig, summarize_exclude_modules

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from modelopt.torch.export.quant_utils import _prefix_wildcard_summarize_exclude_modules


@pytest.fixture(scope="module")
def reference(shared_dir: Path) -> Path:
    return shared_dir / "docs" / "modelopt_reference"


def test_reads_and_rewrites_modelopt_reference_files(reference: Path, tmp_path: Path) -> None:
    hf = json.loads((reference / "hf_quant_config.json").read_text())
    block = json.loads((reference / "config.json").read_text())["quantization_config"]
    from_hf = QuantConfig.from_hf_quant_config(hf)
    from_block = QuantConfig.from_config_block(block)
    assert from_hf == from_block
    assert from_hf.quant_algo == "NVFP4" and from_hf.group_size == 16 and from_hf.kv_cache_quant_algo is None
    assert from_hf.producer == {"name": "modelopt", "version": "0.47.0"}
    # written back key for key, in ModelOpt's key order
    assert json.dumps(from_hf.to_hf_quant_config()) == json.dumps(hf)
    assert json.dumps(from_hf.to_config_quantization_block()) == json.dumps(block)
    # directory reading: config.json's block, or hf_quant_config.json alone
    (tmp_path / "hf_quant_config.json").write_text(json.dumps(hf))
    assert QuantConfig.from_checkpoint_dir(tmp_path) == from_hf
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_5_text"}))
    assert QuantConfig.from_checkpoint_dir(tmp_path) == from_hf
    (tmp_path / "hf_quant_config.json").unlink()
    assert QuantConfig.from_checkpoint_dir(tmp_path) is None


def test_write_produces_both_files(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_5_text", "hidden_size": 64}))
    qc = QuantConfig("W4A16_NVFP4", kv_cache_quant_algo="FP8", exclude_modules=("lm_head", "model.visual*"))
    qc.write(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["hidden_size"] == 64
    block = config["quantization_config"]
    assert block["config_groups"]["group_0"] == {
        "weights": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16},
        "targets": ["Linear"],
    }
    assert block["kv_cache_scheme"] == {"dynamic": False, "num_bits": 8, "type": "float"}
    assert block["ignore"] == ["lm_head", "model.visual*"] and block["quant_method"] == "modelopt"
    assert QuantConfig.from_checkpoint_dir(tmp_path) == qc
    assert QuantConfig.from_hf_quant_config(json.loads((tmp_path / "hf_quant_config.json").read_text())) == qc
    assert not qc.has_input_scales and QuantConfig("NVFP4").has_input_scales


@pytest.mark.parametrize(
    ("quant", "message"),
    [
        (
            {"quant_algo": "NVFP4_AWQ", "group_size": 16},
            "unsupported quant_algo 'NVFP4_AWQ': fp4serve supports NVFP4, W4A16_NVFP4",
        ),
        ({"quant_algo": "MIXED_PRECISION"}, "supports NVFP4, W4A16_NVFP4"),
        ({"quant_algo": "NVFP4", "group_size": 32}, "group_size 32"),
        ({"quant_algo": "NVFP4", "exclude_modules": "lm_head"}, "exclude_modules must be a list"),
        ({"group_size": 16}, "no 'quantization.quant_algo'"),
    ],
)
def test_bad_hf_quant_config_is_rejected(tmp_path: Path, quant: dict, message: str) -> None:
    (tmp_path / "hf_quant_config.json").write_text(json.dumps({"quantization": quant}))
    with pytest.raises(ValueError, match=message) as info:
        QuantConfig.from_checkpoint_dir(tmp_path)
    assert "hf_quant_config.json" in str(info.value)


def test_bad_config_json_is_rejected(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"quantization_config": {"quant_method": "compressed-tensors"}}))
    with pytest.raises(ValueError, match="quant_method 'compressed-tensors'"):
        QuantConfig.from_checkpoint_dir(tmp_path)
    config.write_text(json.dumps({"quantization_config": {"quant_method": "modelopt", "quant_algo": "FP8"}}))
    with pytest.raises(ValueError, match=r"config.json: unsupported quant_algo 'FP8'"):
        QuantConfig.from_checkpoint_dir(tmp_path)
    config.write_text("{")
    with pytest.raises(ValueError, match="config.json is not readable JSON"):
        QuantConfig.from_checkpoint_dir(tmp_path)


def test_exclusion_matching_follows_vllm() -> None:
    qc = QuantConfig(
        "NVFP4",
        exclude_modules=(
            "lm_head",
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.self_attn.k_proj",
            "model.layers.0.self_attn.v_proj",
            "model.layers.1.mlp.gate_proj",
            "model.visual*",
            "*.linear_attn.in_proj_b",
            "model.layers.2",
        ),
    )
    # exact, and fused names whose shards are all excluded
    assert qc.is_excluded("lm_head")
    assert qc.is_excluded("model.layers.0.self_attn.qkv_proj")
    assert not qc.is_excluded("model.layers.3.self_attn.qkv_proj")
    with pytest.raises(ValueError, match="some but not all shards of fused module model.layers.1.mlp.gate_up_proj"):
        qc.is_excluded("model.layers.1.mlp.gate_up_proj")
    # legacy substring: an entry inside a longer name, which over-matches layers 20..29 too
    assert qc.is_excluded("model.layers.2.mlp.down_proj")
    assert qc.is_excluded("model.layers.21.mlp.down_proj")
    assert qc.is_excluded("language_model.lm_head")
    assert not qc.is_excluded("model.layers.3.mlp.down_proj")
    # fnmatch, with `path*` also covering `path` and `path.*`
    assert qc.is_excluded("model.visual")
    assert qc.is_excluded("model.visual.blocks.0.attn.qkv")
    assert qc.is_excluded("model.layers.5.linear_attn.in_proj_b")
    assert not qc.is_excluded("model.layers.5.linear_attn.in_proj_a")
    assert not QuantConfig("NVFP4").is_excluded("model.layers.0.mlp.up_proj")


def test_reference_exclude_list_matches_the_modules_modelopt_left_unquantized(reference: Path) -> None:
    qc = QuantConfig.from_hf_quant_config(json.loads((reference / "hf_quant_config.json").read_text()))
    names = [line.split()[0] for line in (reference / "tensors.txt").read_text().splitlines() if line[0] != "#"]
    quantized = {n.removesuffix(".weight_scale") for n in names if n.endswith(".weight_scale")}
    linears = {n.removesuffix(".weight") for n in names if n.endswith(".weight")}
    for module in sorted(linears):
        assert qc.is_excluded(module) == (module not in quantized and module in set(qc.exclude_modules))
    assert all(not qc.is_excluded(m) for m in quantized)


def modelopt_summary(unquantized: list[str], quantized: list[str]) -> list[str]:
    return sorted(_prefix_wildcard_summarize_exclude_modules(unquantized, quantized))


def test_summarize_matches_modelopt_on_hand_cases() -> None:
    quantized = [f"model.layers.{i}.mlp.{p}" for i in range(12) for p in ("up_proj", "down_proj")]
    quantized += ["model.layers.10.linear_attn.in_proj_qkv"]
    unquantized = ["lm_head", "model.embed_tokens", "model.layers.1.linear_attn.conv1d", "model.layers.1.mlp.gate"]
    unquantized += ["model.visual.blocks.0.attn.qkv", "model.visual.merger.fc1", "mtp.fc"]
    unquantized += ["model.layers.1.linear_attn.in_proj_a", "model.layers.10.linear_attn.in_proj_a"]
    ours = summarize_exclude_modules(unquantized, quantized)
    assert ours == modelopt_summary(unquantized, quantized)
    # single components never become wildcards; a layer's subtree does once nothing quantized lives under it
    assert ours == [
        "lm_head",
        "model.embed_tokens",
        "model.layers.1.linear_attn*",
        "model.layers.1.mlp.gate",
        "model.layers.10.linear_attn.in_proj_a",
        "model.visual*",
        "mtp*",
    ]
    config = QuantConfig("NVFP4", exclude_modules=tuple(ours))
    assert all(config.is_excluded(m) for m in unquantized)
    assert not any(config.is_excluded(m) for m in quantized)


def test_summarize_matches_modelopt_on_random_module_trees() -> None:
    rng = random.Random(0)
    parts = ["model", "layers", "mlp", "attn", "visual", "blocks", "1", "10", "2", "proj", "gate", "up", "a", "ab"]
    for _ in range(200):
        names = sorted({".".join(rng.choice(parts) for _ in range(rng.randint(1, 4))) for _ in range(12)})
        rng.shuffle(names)
        cut = rng.randint(0, len(names))
        quantized, unquantized = names[:cut], names[cut:]
        ours = summarize_exclude_modules(unquantized, quantized)
        assert ours == modelopt_summary(unquantized, quantized), (unquantized, quantized)
        # every unquantized module is matched by an entry, and no entry's pattern matches a quantized module
        assert all(any(fnmatchcase(m, e) for e in ours) for m in unquantized)
        assert not any(fnmatchcase(q, e) for q in quantized for e in ours)


def test_summarize_keeps_the_reference_list_uncompressed(reference: Path) -> None:
    hf = json.loads((reference / "hf_quant_config.json").read_text())
    names = [line.split()[0] for line in (reference / "tensors.txt").read_text().splitlines() if line[0] != "#"]
    quantized = sorted({n.removesuffix(".weight_scale") for n in names if n.endswith(".weight_scale")})
    unquantized = hf["quantization"]["exclude_modules"]
    assert summarize_exclude_modules(unquantized, quantized) == modelopt_summary(unquantized, quantized) == unquantized
    with pytest.raises(ValueError, match="both quantized and unquantized"):
        summarize_exclude_modules(["a.b"], ["a.b"])

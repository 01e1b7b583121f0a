"""`fp4serve serve` command line: vLLM's flags accepted, unsupported values refused before anything loads."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

import pytest

from fp4serve.cli import build_parser, main
from fp4serve.commands import serve

MODEL_CARD_LINE = """vllm serve {model} \\
  --quantization modelopt \\
  --gpu-memory-utilization 0.75 \\
  --max-model-len -1 \\
  --enable-auto-tool-choice \\
  --tool-call-parser qwen3_coder \\
  --reasoning-parser qwen3 \\
  --served-model-name qwen3.5-27b \\
  --trust-remote-code"""


def _nvfp4_stub(tmp_path: Path, algo: str = "NVFP4") -> Path:
    """A directory that looks like a ModelOpt checkpoint to the flag checks (they read only the JSON files)."""
    model = tmp_path / "ckpt"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "qwen3_5_text"}))
    (model / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": algo}}))
    return model


def _bf16_stub(tmp_path: Path) -> Path:
    model = tmp_path / "bf16"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "qwen3_5_text"}))
    return model


def _args(line: str) -> argparse.Namespace:
    words = shlex.split(line.replace("\\\n", " "))
    if words[:2] == ["vllm", "serve"]:
        words = words[2:]
    return build_parser().parse_args(["serve", *words])


def test_model_card_line_is_accepted_as_written(tmp_path):
    model = _nvfp4_stub(tmp_path)
    model_dir, settings, config = serve.prepare(_args(MODEL_CARD_LINE.format(model=model)))
    assert model_dir == model
    assert settings.served_model_names == ("qwen3.5-27b",)
    assert settings.model_name == "qwen3.5-27b"
    assert settings.auto_tools and settings.tool_call_parser == "qwen3_coder"
    assert settings.reasoning_parser == "qwen3"
    assert config.max_model_len == -1
    assert config.gpu_memory_utilization == 0.75


@pytest.mark.parametrize(
    ("flag", "expected"),
    [("-1", -1), ("auto", -1), ("4096", 4096), ("32k", 32000), ("32K", 32768)],
)
def test_max_model_len_spellings(tmp_path, flag, expected):
    model = _bf16_stub(tmp_path)
    _, _, config = serve.prepare(_args(f"{model} --max-model-len {flag}"))
    assert config.max_model_len == expected


def test_engine_flags_reach_the_engine_config(tmp_path):
    model = _bf16_stub(tmp_path)
    line = (
        f"{model} --kv-cache-memory 64MiB --max-num-seqs 7 --max-num-batched-tokens 333 --device cpu "
        "--dtype bf16 --enforce-eager --max-waiting-requests 9 --api-key k --port 1234"
    )
    _, settings, config = serve.prepare(_args(line))
    assert config.kv_cache_memory_bytes == 64 << 20
    assert (config.max_num_seqs, config.max_num_batched_tokens) == (7, 333)
    assert (config.device, config.dtype, config.enforce_eager) == ("cpu", "bfloat16", True)
    assert settings.max_waiting_requests == 9 and settings.api_key == "k"
    # without the tool flags an explicit model serves plain text, like vllm serve
    assert settings.tool_call_parser is None and not settings.auto_tools and settings.reasoning_parser is None
    assert settings.served_model_names == (str(model),)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("--tool-call-parser hermes", "--tool-call-parser 'hermes' is not supported"),
        ("--reasoning-parser deepseek_r1", "--reasoning-parser 'deepseek_r1' is not supported"),
        ("--enable-auto-tool-choice", "requires --tool-call-parser"),
        ("--tensor-parallel-size 2", "--tensor-parallel-size 2: only 1 is supported"),
        ("-tp 4", "--tensor-parallel-size 4"),
        ("--pipeline-parallel-size 2", "--pipeline-parallel-size 2"),
        ("--quantization awq", "--quantization 'awq' is not supported"),
        ("--quantization modelopt", "is not a ModelOpt-quantized checkpoint"),
        ("--gpu-memory-utilization 1.5", "--gpu-memory-utilization"),
        ("--max-model-len 12q", "--max-model-len"),
        ("--max-model-len 0", "--max-model-len"),
        ("--kv-cache-memory lots", "--kv-cache-memory"),
        ("--dtype int8", "--dtype"),
        ("--max-num-seqs 0", "--max-num-seqs"),
        ("--max-waiting-requests -1", "--max-waiting-requests"),
        ("--generation-config /some/path", "--generation-config"),
    ],
)
def test_unsupported_values_are_startup_errors(tmp_path, extra, message):
    model = _bf16_stub(tmp_path)
    with pytest.raises(ValueError, match=None) as info:
        serve.prepare(_args(f"{model} {extra}"))
    assert message in str(info.value)


def test_quantization_checked_against_the_checkpoint(tmp_path):
    fp8 = _nvfp4_stub(tmp_path, algo="FP8")
    with pytest.raises(ValueError, match="quant_algo is 'FP8'"):
        serve.prepare(_args(f"{fp8} --quantization modelopt_fp4"))


def test_bad_model_paths(tmp_path):
    with pytest.raises(ValueError, match="is not a checkpoint directory"):
        serve.prepare(_args(str(tmp_path / "nope")))
    with pytest.raises(ValueError, match="has no config.json"):
        serve.prepare(_args(str(tmp_path)))


def test_no_model_means_the_bundled_demo(tmp_path, monkeypatch):
    monkeypatch.setattr(serve, "DEMO_MODEL_DIR", tmp_path / "demo_model")
    with pytest.raises(ValueError, match="bundled demo model is missing"):
        serve.prepare(_args(""))
    demo = tmp_path / "demo_model"
    demo.mkdir()
    (demo / "config.json").write_text("{}")
    model_dir, settings, _ = serve.prepare(_args(""))
    assert model_dir == demo
    # the demo shows the whole API: tool and reasoning parsers are on
    assert settings.model_name == serve.DEMO_SERVED_NAME
    assert settings.auto_tools and settings.reasoning_parser == "qwen3"


def test_cli_exit_code_2_with_one_clear_line(tmp_path, capsys):
    model = _bf16_stub(tmp_path)
    assert main(["serve", str(model), "--tool-call-parser", "hermes"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "qwen3_coder" in err[0]

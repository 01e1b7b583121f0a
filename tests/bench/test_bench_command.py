"""`fp4serve bench` end to end on CPU with the tiny geometry: JSON with the expected keys, a PNG, positive numbers."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from fp4serve.cli import main

TINY_RUN = [
    "bench",
    "--geometry", "tiny",
    "--device", "cpu",
    "--models", "nvfp4,bf16",
    "--batch-sizes", "1,4",
    "--context-len", "16",
    "--decode-steps", "3",
    "--warmup-steps", "1",
    "--prefill-prompts", "2",
    "--prefill-len", "32",
    "--ttft-len", "24",
    "--runs", "2",
    "--warmup-runs", "0",
    # smaller than the prompts together: chunked prefill, and early requests decode while later ones prefill
    "--max-num-batched-tokens", "40",
    "--copy-bytes", "4MiB",
    "--matmul-size", "128",
]  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread():
    # the tiny model's ops are far too small to share out: with 2 threads on a busy 2-core box each op waits on
    # the other thread (measured: 54 s instead of 9 s for this module)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_bench_runs_end_to_end_on_cpu(tmp_path, capsys):
    out = tmp_path / "results" / "run.json"
    assert main([*TINY_RUN, "--output", str(out)]) == 0

    results = json.loads(out.read_text())
    for key in ("schema", "date", "device_name", "torch", "triton", "settings", "geometry", "ceilings", "models"):
        assert key in results, key
    assert results["settings"]["batch_sizes"] == [1, 4]
    assert results["geometry"]["num_hidden_layers"] == 4
    assert results["ceilings"]["copy_bytes_per_s"] > 0 and results["ceilings"]["matmul_flops_per_s"] > 0

    models = results["models"]
    assert list(models) == ["nvfp4", "bf16"]
    for kind, entry in models.items():
        assert entry["status"] == "ok", (kind, entry["status"])
        assert entry["finite_hidden_states"] is True
        assert entry["weight_bytes"] > 0
        assert [d["batch"] for d in entry["decode"]] == [1, 4]
        for d in entry["decode"]:
            assert d["status"] == "ok" and d["steps"] == 3
            assert d["tok_s"] > 0 and d["step_ms_median"] > 0 and d["floor_tok_s"] > 0
            assert 0 < d["fraction_of_floor"]
            # timed steps run at the prompt length plus the tokens generated so far
            assert d["mean_context_len"] >= 16
        assert entry["prefill"]["tok_s"] > 0 and entry["prefill"]["floor_tok_s"] > 0
        assert entry["prefill"]["engine_steps"] >= 2  # 64 prompt tokens through a 40-token budget
        assert len(entry["ttft"]["runs_ms"]) == 2 and entry["ttft"]["ms_median"] > 0 and entry["ttft"]["floor_ms"] > 0
    # same geometry: NVFP4 linears take ~4.5 bits per weight, so the model is smaller than its fp32 twin
    assert models["nvfp4"]["weight_bytes"] < models["bf16"]["weight_bytes"]
    assert models["nvfp4"]["footprint"]["matmul_params"] == models["bf16"]["footprint"]["matmul_params"]

    chart = out.with_suffix(".png")
    with Image.open(chart) as img:
        assert img.format == "PNG" and img.width > 200 and img.height > 100

    table = capsys.readouterr().out
    assert "of floor" in table and "decode b=4 ctx=16" in table and "TTFT 24 tok" in table


def test_time_budget_skips_models_but_still_writes_results(tmp_path, capsys):
    # a directory as --output gets the default name: <card>-<geometry>-<timestamp>.json
    assert main([*TINY_RUN, "--time-budget", "0", "--output", str(tmp_path)]) == 0
    (out,) = tmp_path.glob("*.json")
    assert out.name.startswith("cpu-tiny-")
    results = json.loads(out.read_text())
    assert results["ceilings"]["copy_bytes_per_s"] > 0
    assert all(entry["status"].startswith("skipped: the time budget") for entry in results["models"].values())
    assert out.with_suffix(".png").is_file()
    assert "budget" in capsys.readouterr().out


def test_bad_arguments_are_user_errors(tmp_path, capsys):
    assert main([*TINY_RUN, "--geometry", "huge", "--output", str(tmp_path / "x.json")]) == 2
    assert "unknown geometry 'huge'" in capsys.readouterr().err
    assert main([*TINY_RUN, "--models", "nvfp4,vllm", "--output", str(tmp_path / "y.json")]) == 2
    assert "unknown models ['vllm']" in capsys.readouterr().err

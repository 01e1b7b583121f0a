"""`fp4serve bench` on a CUDA device: the tiny geometry end to end with every model, and a full-width 27B slice
built on the device in seconds."""

from __future__ import annotations

import json

import pytest
import torch

from fp4serve.bench.geometry import geometry_config, text_config
from fp4serve.bench.random_model import meta_model
from fp4serve.cli import main

pytestmark = pytest.mark.gpu


def test_tiny_bench_on_the_gpu(tmp_path):
    out = tmp_path / "gpu.json"
    args = [
        "bench", "--geometry", "tiny", "--device", "cuda", "--batch-sizes", "1,8", "--hf-batch-sizes", "1",
        "--context-len", "64", "--decode-steps", "5", "--prefill-prompts", "2", "--prefill-len", "128",
        "--ttft-len", "128", "--runs", "2", "--copy-bytes", "256MiB", "--matmul-size", "2048", "--output", str(out),
    ]  # fmt: skip
    assert main(args) == 0
    results = json.loads(out.read_text())
    assert results["device_name"] == torch.cuda.get_device_name()
    assert results["ceilings"]["copy_bytes_per_s"] > 1e11
    for kind in ("nvfp4", "bf16"):
        entry = results["models"][kind]
        assert entry["status"] == "ok" and entry["finite_hidden_states"]
        assert entry["peak_memory_allocated"] >= entry["weight_bytes"] > 0
        for d in entry["decode"]:
            # faster than the floor would mean the byte count is wrong
            assert d["status"] == "ok" and 0 < d["fraction_of_floor"] <= 1.05
        assert 0 < entry["prefill"]["fraction_of_floor"] <= 1.05 and 0 < entry["ttft"]["fraction_of_floor"] <= 1.05
    assert results["models"]["transformers"]["status"] in ("ok", "skipped: transformers with Qwen3.5 is not importable")
    assert out.with_suffix(".png").is_file()


def test_full_width_27b_slice_builds_fast_on_the_gpu(tmp_path):
    out = tmp_path / "slice.json"
    args = [
        "bench", "--geometry", "27b-4l", "--device", "cuda", "--models", "nvfp4", "--phases", "ttft",
        "--ttft-len", "512", "--runs", "1", "--output", str(out),
    ]  # fmt: skip
    assert main(args) == 0
    entry = json.loads(out.read_text())["models"]["nvfp4"]
    assert entry["status"] == "ok" and entry["finite_hidden_states"]
    assert entry["build_s"] < 10
    shapes = meta_model(text_config(geometry_config("27b-4l")), quant="nvfp4", dtype=torch.bfloat16)
    assert entry["weight_bytes"] == sum(t.nbytes for t in [*shapes.parameters(), *shapes.buffers()])
    assert entry["ttft"]["status"] == "ok"

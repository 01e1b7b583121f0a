"""Parity with nvidia-modelopt 0.47 on the tiny Austen fixture: the same calibration windows go to
`mtq.quantize(NVFP4_DEFAULT_CFG)` + `export_hf_checkpoint` (transformers' Qwen3_5ForCausalLM) and to
`fp4serve quantize --recipe default --algorithm max`; the two checkpoints must agree tensor for tensor.

Calibration is kept small (4 windows of 128 tokens from the start of Emma) so the test stays cheap. Both sides run
the calibration forward in bfloat16 (ModelOpt through transformers, ours with --calib-dtype bfloat16), so activation
maxima differ only by bf16 rounding-order effects.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from fp4serve.checkpoint.safetensors_io import CheckpointReader
from fp4serve.cli import main
from fp4serve.quant.calib_data import token_windows
from fp4serve.tokenizer import Tokenizer

WINDOWS, SEQ_LEN = 4, 128


@pytest.fixture(scope="module")
def exports(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    fixture = shared_dir / "fixtures" / "austen-qwen35-tiny"
    root = tmp_path_factory.mktemp("parity")
    calib = root / "emma_start.txt"
    calib.write_text((shared_dir / "corpus" / "austen" / "emma.txt").read_text(encoding="utf-8")[:20000])
    windows = token_windows(Tokenizer.from_dir(fixture), [calib], SEQ_LEN, WINDOWS)
    assert windows.num_windows == WINDOWS

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import modelopt.torch.quantization as mtq
        from modelopt.torch.export import export_hf_checkpoint
        from transformers import Qwen3_5ForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        model = Qwen3_5ForCausalLM.from_pretrained(fixture, dtype=torch.bfloat16).eval()

        def forward_loop(m: torch.nn.Module) -> None:
            # the decoder only: lm_head is not quantized, so its (large) matmul is not needed
            with torch.no_grad():
                for window in windows.tokens:
                    m.model(window[None])

        mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, forward_loop)
        export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=root / "modelopt")

    ours = root / "fp4serve"
    args = ["quantize", str(fixture), "--output", str(ours), "--calib-data", str(calib), "--no-progress"]
    args += ["--calib-samples", str(WINDOWS), "--calib-seq-len", str(SEQ_LEN), "--recipe", "default"]
    assert main([*args, "--algorithm", "max", "--calib-dtype", "bfloat16"]) == 0
    return root / "modelopt", ours


def test_same_tensors_same_bytes(exports: tuple[Path, Path]) -> None:
    theirs, ours = (CheckpointReader(p) for p in exports)
    assert ours.names() == theirs.names()
    input_scales = 0
    for name in ours.names():
        assert ours.dtype(name) == theirs.dtype(name) and ours.shape(name) == theirs.shape(name), name
        a, b = ours.get(name), theirs.get(name)
        if name.endswith(".input_scale"):
            input_scales += 1
            assert float(a) == pytest.approx(float(b), rel=0.02), name
        else:
            # every weight (packed NVFP4 or BF16), weight_scale and weight_scale_2, bit for bit
            assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), name
    assert input_scales == 75


def test_same_quant_configs(exports: tuple[Path, Path]) -> None:
    theirs, ours = exports
    hf_theirs, hf_ours = (json.loads((p / "hf_quant_config.json").read_text()) for p in exports)
    assert hf_ours.keys() == hf_theirs.keys()
    assert json.dumps(hf_ours["quantization"]) == json.dumps(hf_theirs["quantization"])
    assert hf_ours["producer"]["name"] == "fp4serve" and hf_theirs["producer"]["name"] == "modelopt"
    block_theirs, block_ours = (json.loads((p / "config.json").read_text())["quantization_config"] for p in exports)
    assert list(block_ours) == list(block_theirs)
    block_ours.pop("producer"), block_theirs.pop("producer")
    assert json.dumps(block_ours) == json.dumps(block_theirs)

"""A quantized checkpoint (NVFP4 embedding included) loads with our loader and generates; `fp4serve eval` measures
perplexity like transformers does, KL 0 / agreement 1 for a model against itself, and a real gap for NVFP4."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fp4serve.cli import main
from fp4serve.llm import LLM
from fp4serve.model.embedding import NVFP4Embedding
from fp4serve.model.loader import load_model
from fp4serve.quant.calib_data import token_windows
from fp4serve.quant.nvfp4 import dequantize_weight
from fp4serve.sampling import SamplingParams
from fp4serve.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def demo(shared_dir: Path) -> Path:
    return shared_dir / "fixtures" / "austen-qwen35-demo"


@pytest.fixture(scope="module")
def texts(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("texts")
    corpus = shared_dir / "corpus" / "austen"
    calib, held_out = root / "calib.txt", root / "held_out.txt"
    calib.write_text((corpus / "prideprejudice.txt").read_text(encoding="utf-8")[5000:15000])
    held_out.write_text((corpus / "persuasion.txt").read_text(encoding="utf-8")[20000:26000])
    return calib, held_out


@pytest.fixture(scope="module")
def quantized_demo(demo: Path, texts: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "nvfp4"
    args = ["quantize", str(demo), "--output", str(out), "--calib-data", str(texts[0]), "--no-progress"]
    assert main([*args, "--calib-samples", "4", "--calib-seq-len", "128", "--quantize-embedding"]) == 0
    return out


def test_nvfp4_embedding_is_flagged_and_loaded(quantized_demo: Path, demo: Path) -> None:
    hf = json.loads((quantized_demo / "hf_quant_config.json").read_text())
    assert hf["quantization"]["nvfp4_embed"] is True
    assert "model.embed_tokens" not in hf["quantization"]["exclude_modules"]
    config = json.loads((quantized_demo / "config.json").read_text())
    assert config["quantization_config"]["nvfp4_embed"] is True
    # the bundled demo model is this checkpoint: it must stay small
    assert (quantized_demo / "model.safetensors").stat().st_size < 20e6

    model = load_model(quantized_demo, dtype=torch.float32, progress=False)
    embed = model.model.embed_tokens
    assert isinstance(embed, NVFP4Embedding)
    ids = torch.tensor([[11, 248000], [5, 11]])
    dense = dequantize_weight(embed.weight, embed.weight_scale, embed.weight_scale_2)
    assert torch.equal(embed(ids), dense[ids])
    hidden = torch.randn(3, model.config.hidden_size)
    assert torch.allclose(model.compute_logits(hidden), hidden @ dense.T, rtol=1e-5, atol=1e-5)
    reference = load_model(demo, dtype=torch.float32, progress=False).model.embed_tokens.weight.detach()
    assert float((dense - reference).norm() / reference.norm()) < 0.15


def test_quantized_demo_generates_like_the_original(quantized_demo: Path, demo: Path) -> None:
    prompt = "It is a truth universally acknowledged, that a single man in possession of a good fortune"
    params = SamplingParams(temperature=0, max_tokens=12)
    llm = LLM(quantized_demo, max_num_seqs=1, max_num_batched_tokens=256, max_model_len=256)
    ours = llm.generate(prompt, params)[0]
    assert ours.finish_reason == "length" and len(ours.token_ids) == 12
    words = ours.text.split()
    assert len(words) >= 5 and sum(w.strip(",.;:!?'\"").isalpha() for w in words) >= len(words) - 2, ours.text


def test_eval_matches_transformers_and_separates_models(
    quantized_demo: Path, demo: Path, texts: tuple[Path, Path], capsys
) -> None:
    held_out = texts[1]
    args = ["eval", str(demo), str(demo), str(quantized_demo), "--data", str(held_out), "--seq-len", "128"]
    assert main([*args, "--max-windows", "2", "--json", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["windows"] == 2 and result["tokens_scored"] == 2 * 127
    ref, same, quant = result["reference"], *result["candidates"]
    assert same["kl"] == pytest.approx(0, abs=1e-6) and same["top1_agreement"] == 1.0
    assert same["perplexity"] == ref["perplexity"]
    assert 1e-4 < quant["kl"] < 1.0 and 0.6 < quant["top1_agreement"] < 1.0

    from transformers import Qwen3_5ForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf = Qwen3_5ForCausalLM.from_pretrained(demo, dtype=torch.float32).eval()
    windows = token_windows(Tokenizer.from_dir(demo), [held_out], 128, 2).tokens
    with torch.no_grad():
        loss = torch.stack([hf(w[None], labels=w[None]).loss for w in windows]).mean()
    assert ref["nll"] == pytest.approx(float(loss), rel=1e-4)

    w4a4 = ["eval", str(demo), str(quantized_demo), "--data", str(held_out), "--seq-len", "128", "--max-windows", "1"]
    assert main([*w4a4, "--linear-mode", "w4a4", "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "w4a4" in table and "top-1 agree" in table and str(quantized_demo) in table

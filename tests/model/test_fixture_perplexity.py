"""Perplexity of the trained tiny fixture (austen-qwen35-tiny, BF16 weights, tied embeddings) on the first 8
non-overlapping 512-token windows of Persuasion: ours vs transformers, and ours on a ModelOpt NVFP4 export of it.

Both models compute in float32 (the BF16 weights are exact in float32, and float32 matmuls are the fast path on
CPU). The NVFP4 checkpoint is produced inside the test by nvidia-modelopt (`NVFP4_DEFAULT_CFG`, a few calibration
windows taken after the scored text) and scored with W4A4 emulation (activations quantized with the exported
input scales, i.e. what NVFP4 means; W4A16 uses the same weights); the numbers are printed for the record."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from qwen35_harness import Pager
from torch import nn

from fp4serve.model.linear import NVFP4Linear
from fp4serve.model.loader import load_model
from fp4serve.model.qwen3_5 import Qwen35ForCausalLM

WINDOW, NUM_WINDOWS = 512, 8


@pytest.fixture(scope="module")
def fixture_dir(shared_dir: Path) -> Path:
    return shared_dir / "fixtures" / "austen-qwen35-tiny"


@pytest.fixture(scope="module")
def token_ids(fixture_dir: Path, shared_dir: Path) -> torch.Tensor:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(fixture_dir / "tokenizer.json"))
    text = (shared_dir / "corpus" / "austen" / "persuasion.txt").read_text(encoding="utf-8")
    return torch.tensor(tokenizer.encode(text, add_special_tokens=False).ids)


@pytest.fixture(scope="module")
def windows(token_ids: torch.Tensor) -> torch.Tensor:
    return token_ids[: NUM_WINDOWS * WINDOW].view(NUM_WINDOWS, WINDOW)


def perplexity(model: Qwen35ForCausalLM, windows: torch.Tensor) -> float:
    """exp(mean next-token NLL) over every window, each window scored on its own from an empty cache."""
    total = 0.0
    for window in windows:
        pager = Pager(model, num_seqs=1, max_len=WINDOW)
        batch = pager.batch([(0, window.tolist(), 0)], all_logits=True)
        with torch.no_grad():
            hidden = model(batch, pager.cache)[:-1]
            total += F.cross_entropy(model.compute_logits(hidden), window[1:], reduction="sum").item()
    return math.exp(total / (windows.shape[0] * (WINDOW - 1)))


@pytest.fixture(scope="module")
def bf16_perplexity(fixture_dir: Path, windows: torch.Tensor) -> float:
    return perplexity(load_model(fixture_dir, dtype=torch.float32, progress=False), windows)


def test_bf16_fixture_perplexity_matches_transformers(
    fixture_dir: Path, windows: torch.Tensor, bf16_perplexity: float
) -> None:
    from transformers import Qwen3_5ForCausalLM

    hf = Qwen3_5ForCausalLM.from_pretrained(fixture_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        losses = [hf(w[None], labels=w[None]).loss.item() for w in windows]
    reference = math.exp(sum(losses) / len(losses))
    print(f"austen-qwen35-tiny perplexity: ours {bf16_perplexity:.4f}, transformers {reference:.4f}")
    assert abs(bf16_perplexity / reference - 1) < 0.005


@pytest.mark.filterwarnings("ignore:Model's original dtype")
@pytest.mark.filterwarnings("ignore:transformers .* is not tested with current version of modelopt")
def test_modelopt_nvfp4_export_loads_and_scores(
    fixture_dir: Path, token_ids: torch.Tensor, windows: torch.Tensor, bf16_perplexity: float, tmp_path: Path
) -> None:
    mtq = pytest.importorskip("modelopt.torch.quantization")
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import Qwen3_5ForCausalLM

    # calibrated in float32 (bf16 matmuls are slow on CPU); unquantized tensors are then exported as float32
    hf = Qwen3_5ForCausalLM.from_pretrained(fixture_dir, dtype=torch.float32).eval()
    start = NUM_WINDOWS * WINDOW
    calibration = token_ids[start : start + 4 * 128].view(4, 128)

    def forward_loop(model: nn.Module) -> None:
        # the decoder body only: lm_head stays BF16 under NVFP4_DEFAULT_CFG, so its (large) matmul is not needed
        with torch.no_grad():
            for ids in calibration:
                model.model(ids[None])

    mtq.quantize(hf, mtq.NVFP4_DEFAULT_CFG, forward_loop)
    export_hf_checkpoint(hf, dtype=torch.bfloat16, export_dir=tmp_path)
    del hf

    model = load_model(tmp_path, dtype=torch.float32, linear_mode="w4a4", progress=False)
    layer0 = model.model.layers[0]
    assert isinstance(layer0.mlp.gate_proj, NVFP4Linear) and isinstance(layer0.linear_attn.in_proj_qkv, NVFP4Linear)
    assert isinstance(layer0.linear_attn.in_proj_a, nn.Linear)  # excluded by ModelOpt's default policy
    assert float(layer0.mlp.gate_proj.input_scale) > 0
    nvfp4_perplexity = perplexity(model, windows)
    print(f"austen-qwen35-tiny perplexity: BF16 {bf16_perplexity:.4f}, NVFP4 (w4a4) {nvfp4_perplexity:.4f}")
    assert 1.0 < nvfp4_perplexity / bf16_perplexity < 1.05

"""The vision tower in BF16 on a GPU (the serving configuration) against the float32 CPU tower."""

from __future__ import annotations

import pytest
import torch

from fp4serve.model.vision import Qwen35VisionModel, VisionConfig

GRIDS = [(1, 8, 12), (1, 4, 2), (3, 6, 4)]


@pytest.mark.gpu
def test_bf16_cuda_tower_matches_float32():
    cfg = VisionConfig(depth=3, hidden_size=144, num_heads=2, intermediate_size=200, out_hidden_size=96,
                       num_position_embeddings=64)
    torch.manual_seed(0)
    ref_model = Qwen35VisionModel(cfg)
    with torch.no_grad():
        for p in ref_model.parameters():
            p.normal_(0.0, 0.1)
    gpu_model = Qwen35VisionModel(cfg).to("cuda", torch.bfloat16)
    gpu_model.load_state_dict(ref_model.state_dict())
    pixels = torch.randn(sum(t * h * w for t, h, w in GRIDS), cfg.patch_dim)
    with torch.no_grad():
        ref = ref_model(pixels, GRIDS)
        out = gpu_model(pixels.cuda(), torch.tensor(GRIDS)).float().cpu()
    assert out.shape == ref.shape
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 3e-2

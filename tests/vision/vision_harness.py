"""Shared constants and builders for the vision tests (a uniquely named module, importable from test files)."""

from __future__ import annotations

import torch

# small special-token ids so the tiny model can keep a small vocabulary
IMAGE_ID, VIDEO_ID, VS_ID, VE_ID = 500, 501, 502, 503
VOCAB = 512

VISION_CONFIG = dict(
    depth=2, hidden_size=64, num_heads=4, intermediate_size=96, out_hidden_size=48, num_position_embeddings=64,
    patch_size=16, temporal_patch_size=2, spatial_merge_size=2, in_channels=3,
)
TEXT_CONFIG = dict(
    hidden_size=48, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
    intermediate_size=96, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
    linear_value_head_dim=16, linear_conv_kernel_dim=4, vocab_size=VOCAB, tie_word_embeddings=False,
    rope_parameters=dict(rope_type="default", rope_theta=1e7, partial_rotary_factor=0.25, mrope_section=[2, 1, 1],
                         mrope_interleaved=True),
)


def build_hf_model():
    """Tiny `Qwen3_5ForConditionalGeneration` in float32 with non-trivial random weights everywhere."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = Qwen3_5Config(
        text_config=TEXT_CONFIG, vision_config=VISION_CONFIG, image_token_id=IMAGE_ID, video_token_id=VIDEO_ID,
        vision_start_token_id=VS_ID, vision_end_token_id=VE_ID, tie_word_embeddings=False,
    )
    model = Qwen3_5ForConditionalGeneration(cfg).float().eval()
    with torch.no_grad():
        # default init leaves norms/biases at 0/1 and hides layout bugs; randomise everything in the tower
        for p in model.model.visual.parameters():
            p.normal_(0.0, 0.2)
    return model

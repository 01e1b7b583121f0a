"""End to end: images + video → preprocessing → vision tower → our text model's logits, against transformers."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from vision_harness import IMAGE_ID, VE_ID, VIDEO_ID, VS_ID

from fp4serve.engine.batch import ForwardBatch
from fp4serve.model.config import Qwen35TextConfig
from fp4serve.model.media import MediaConfig, preprocess_image, preprocess_video
from fp4serve.model.multimodal import MultimodalPrompt, VisionTokenIds, build_multimodal_prompt, encode_media
from fp4serve.model.qwen3_5 import Qwen35ForCausalLM
from fp4serve.model.vision import Qwen35VisionModel, VisionConfig

IDS = VisionTokenIds(image=IMAGE_ID, video=VIDEO_ID, vision_start=VS_ID, vision_end=VE_ID)
BLOCK = 16


def _encode_text(text: str) -> list[int]:
    return [ord(ch) % 400 for ch in text]


@pytest.fixture(scope="module")
def ours(hf_model):
    text = Qwen35ForCausalLM(Qwen35TextConfig.from_dict(hf_model.config.to_dict()), dtype=torch.float32)
    prefix = "model.language_model."
    state = {("model." + k[len(prefix):] if k.startswith(prefix) else k): v for k, v in hf_model.state_dict().items()
             if k.startswith(prefix) or k == "lm_head.weight"}
    text.load_state_dict(state)
    visual = Qwen35VisionModel(VisionConfig.from_dict(hf_model.config.vision_config.to_dict()))
    visual.load_state_dict(hf_model.model.visual.state_dict())
    return text.eval(), visual.eval()


@pytest.fixture(scope="module")
def prompt() -> MultimodalPrompt:
    rng = np.random.default_rng(0)
    cfg = MediaConfig(image_min_pixels=1024, video_min_pixels=1024)
    images = [
        preprocess_image(PIL.Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)), cfg),  # 1x4x6
        preprocess_image(PIL.Image.fromarray(rng.integers(0, 256, (128, 32, 3), dtype=np.uint8)), cfg),  # 1x8x2
    ]
    video = preprocess_video(rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8), cfg)  # 2x4x4
    assert [it.grid_thw for it in images] + [video.grid_thw] == [(1, 4, 6), (1, 8, 2), (2, 4, 4)]
    ids = [10, 11, VS_ID, IMAGE_ID, VE_ID, 12, VS_ID, VIDEO_ID, VE_ID, 13, 14, VS_ID, IMAGE_ID, VE_ID, 15, 16]
    return build_multimodal_prompt(ids, images, [video], ids=IDS, encode_text=_encode_text)


def _hf_logits(hf_model, mm: MultimodalPrompt, extra: list[int]) -> torch.Tensor:
    ids = torch.tensor([mm.token_ids + extra])
    types = torch.zeros_like(ids, dtype=torch.int32)
    types[ids == IMAGE_ID] = 1
    types[ids == VIDEO_ID] = 2
    images = [it for it in mm.items if it.kind == "image"]
    videos = [it for it in mm.items if it.kind == "video"]
    with torch.no_grad():
        out = hf_model(
            input_ids=ids, mm_token_type_ids=types,
            pixel_values=torch.cat([it.pixel_values for it in images]),
            image_grid_thw=torch.tensor([it.grid_thw for it in images]),
            pixel_values_videos=torch.cat([it.pixel_values for it in videos]),
            video_grid_thw=torch.tensor([it.grid_thw for it in videos]),
        )
    return out.logits[0]


@pytest.fixture(scope="module")
def hf_ref(hf_model, prompt) -> torch.Tensor:
    """transformers' logits for the prompt plus one generated token (7), [L + 1, vocab]."""
    return _hf_logits(hf_model, prompt, [7])


def _step(model, cache, mm: MultimodalPrompt, feats: torch.Tensor, start: int, token_ids: list[int]) -> torch.Tensor:
    """One ForwardBatch for tokens start..start+n−1 of a single sequence; returns the logits of every row."""
    n = len(token_ids)
    end = start + n
    rows, sl = mm.feature_slice(start, min(end, mm.num_tokens))
    num_blocks = cache.kv[3].shape[1]
    batch = ForwardBatch(
        input_ids=torch.tensor(token_ids),
        positions=mm.positions_for(start, end),
        cu_seqlens=torch.tensor([0, n], dtype=torch.int32),
        context_lens=torch.tensor([start], dtype=torch.int32),
        seq_lens=torch.tensor([end], dtype=torch.int32),
        slot_mapping=torch.arange(start, end),
        block_tables=torch.arange(num_blocks, dtype=torch.int32)[None],
        state_indices=torch.tensor([0]),
        has_initial_state=torch.tensor([start > 0]),
        logits_indices=torch.arange(n),
        query_lens=(n,),
        context_lens_host=(start,),
        max_query_len=n,
        max_seq_len=end,
        mm_embeds=feats[sl] if rows.numel() else None,
        mm_token_rows=rows if rows.numel() else None,
    )
    with torch.no_grad():
        return model.compute_logits(model(batch, cache)[batch.logits_indices])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_logits_match_transformers(hf_ref, ours, prompt):
    text, visual = ours
    with torch.no_grad():
        feats = encode_media(visual, prompt)
    length = prompt.num_tokens
    cache = text.allocate_cache(length // BLOCK + 2, BLOCK, 1, "cpu", torch.float32)
    logits = _step(text, cache, prompt, feats, 0, prompt.token_ids)
    assert _rel(logits, hf_ref[:length]) < 1e-4


def test_chunked_prefill_then_decode_match_transformers(hf_ref, ours, prompt):
    text, visual = ours
    with torch.no_grad():
        feats = encode_media(visual, prompt)
    length = prompt.num_tokens
    video_start = int(prompt.mm_token_positions[6])
    # chunk boundaries inside the first image's pads and inside the video's first frame
    cuts = [0, 5, video_start + 2, length]
    cache = text.allocate_cache(length // BLOCK + 2, BLOCK, 1, "cpu", torch.float32)
    for a, b in zip(cuts, cuts[1:], strict=False):
        last = _step(text, cache, prompt, feats, a, prompt.token_ids[a:b])[-1]
    decode = _step(text, cache, prompt, feats, length, [7])[-1]
    assert _rel(last, hf_ref[length - 1]) < 1e-4
    assert _rel(decode, hf_ref[length]) < 1e-4

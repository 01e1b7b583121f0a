"""Placeholder expansion and 3-D MRoPE positions against transformers' `get_rope_index`."""

from __future__ import annotations

import pytest
import torch
from vision_harness import IMAGE_ID, VE_ID, VIDEO_ID, VS_ID

from fp4serve.model.media import MediaItem
from fp4serve.model.multimodal import VisionTokenIds, build_multimodal_prompt, encode_media, mrope_positions
from fp4serve.model.vision import Qwen35VisionModel, VisionConfig

IDS = VisionTokenIds(image=IMAGE_ID, video=VIDEO_ID, vision_start=VS_ID, vision_end=VE_ID)


def _image(h: int, w: int) -> MediaItem:
    return MediaItem("image", torch.zeros(h * w, 1536), (1, h, w))


def _video(t: int, h: int, w: int, timestamps: tuple[float, ...]) -> MediaItem:
    return MediaItem("video", torch.zeros(t * h * w, 1536), (t, h, w), timestamps)


def _encode_text(text: str) -> list[int]:
    """Stand-in tokenizer for the timestamp text: one id per character (ids stay below the special ids)."""
    return [ord(ch) % 400 for ch in text]


def test_worked_example_from_the_spec():
    # 3 text + <vs>, image 1x4x6 (2x3 tokens), <ve> 3 text <vs>, video frame 1 (2x2), <ve> text <vs>, frame 2, <ve> text
    ids = [1, 2, 3, VS_ID] + [IMAGE_ID] * 6 + [VE_ID, 4, 5, 6, VS_ID] + [VIDEO_ID] * 4 + [VE_ID, 7, VS_ID]
    ids += [VIDEO_ID] * 4 + [VE_ID, 8]
    pos, delta = mrope_positions(ids, [_image(4, 6), _video(2, 4, 4, (0.5, 1.5))], IDS)
    assert pos[:, :4].tolist() == [[0, 1, 2, 3]] * 3
    assert pos[:, 4:10].t().tolist() == [[4, 4, 4], [4, 4, 5], [4, 4, 6], [4, 5, 4], [4, 5, 5], [4, 5, 6]]
    assert pos[:, 10:15].tolist() == [[7, 8, 9, 10, 11]] * 3
    assert pos[:, 15:19].t().tolist() == [[12, 12, 12], [12, 12, 13], [12, 13, 12], [12, 13, 13]]
    assert pos[:, 19:22].tolist() == [[14, 15, 16]] * 3
    assert pos[:, 22:26].t().tolist() == [[17, 17, 17], [17, 17, 18], [17, 18, 17], [17, 18, 18]]
    assert pos[:, 26:].tolist() == [[19, 20]] * 3
    assert delta == 21 - 28 == -7


def _two_images_and_a_video():
    prompt = [10, 11, VS_ID, IMAGE_ID, VE_ID, 12, VS_ID, VIDEO_ID, VE_ID, 13, 14, VS_ID, IMAGE_ID, VE_ID, 15]
    images = [_image(4, 6), _image(8, 2)]
    videos = [_video(3, 4, 4, (0.25, 1.25, 2.0))]
    return prompt, images, videos


def test_expansion_layout():
    prompt, images, videos = _two_images_and_a_video()
    mm = build_multimodal_prompt(prompt, images, videos, ids=IDS, encode_text=_encode_text)
    frame = [VS_ID] + [VIDEO_ID] * 4 + [VE_ID]
    expected = [10, 11, VS_ID] + [IMAGE_ID] * 6 + [VE_ID, 12]
    for ts in ("<0.2 seconds>", "<1.2 seconds>", "<2.0 seconds>"):
        expected += _encode_text(ts) + frame
    expected += [13, 14, VS_ID] + [IMAGE_ID] * 4 + [VE_ID, 15]
    assert mm.token_ids == expected
    # media in prompt order: image, video, image
    assert mm.grid_thw.tolist() == [[1, 4, 6], [3, 4, 4], [1, 8, 2]]
    assert mm.pixel_values.shape == (24 + 48 + 16, 1536)
    tokens = torch.tensor(expected)
    assert torch.equal(mm.mm_token_positions, torch.nonzero((tokens == IMAGE_ID) | (tokens == VIDEO_ID)).flatten())
    assert mm.mm_token_positions.numel() == (24 + 48 + 16) // 4


def test_positions_match_transformers(hf_model):
    prompt, images, videos = _two_images_and_a_video()
    mm = build_multimodal_prompt(prompt, images, videos, ids=IDS, encode_text=_encode_text)
    ids = torch.tensor([mm.token_ids])
    types = torch.zeros_like(ids, dtype=torch.int32)
    types[ids == IMAGE_ID] = 1
    types[ids == VIDEO_ID] = 2
    ref_pos, ref_delta = hf_model.model.get_rope_index(
        ids, types, image_grid_thw=torch.tensor([[1, 4, 6], [1, 8, 2]]), video_grid_thw=torch.tensor([[3, 4, 4]])
    )
    assert torch.equal(mm.positions, ref_pos[:, 0])
    assert mm.rope_delta == int(ref_delta)


def test_decode_positions_and_feature_slices():
    prompt, images, videos = _two_images_and_a_video()
    mm = build_multimodal_prompt(prompt, images, videos, ids=IDS, encode_text=_encode_text)
    n = mm.num_tokens
    # a chunk that straddles the end of the prompt: prompt positions, then n + rope_delta on all axes
    pos = mm.positions_for(n - 2, n + 3)
    assert torch.equal(pos[:, :2], mm.positions[:, n - 2:])
    assert pos[:, 2:].tolist() == [[n + mm.rope_delta + k for k in range(3)]] * 3
    # chunked prefill: every placeholder row is covered exactly once, in feature order
    rows, features = [], []
    for start in range(0, n, 7):
        rel, sl = mm.feature_slice(start, min(start + 7, n))
        rows.append(rel + start)
        features.extend(range(sl.start, sl.stop))
    assert torch.equal(torch.cat(rows), mm.mm_token_positions)
    assert features == list(range(mm.mm_token_positions.numel()))


def test_text_only_prompt():
    mm = build_multimodal_prompt([5, 6, 7], ids=IDS)
    assert mm.positions.tolist() == [[0, 1, 2]] * 3 and mm.rope_delta == 0
    assert mm.mm_token_positions.numel() == 0 and mm.grid_thw.shape == (0, 3)
    visual = Qwen35VisionModel(VisionConfig(depth=1, hidden_size=16, num_heads=1, intermediate_size=8,
                                            out_hidden_size=24, num_position_embeddings=4))
    assert encode_media(visual, mm).shape == (0, 24)


def test_mismatches_are_rejected():
    prompt, images, videos = _two_images_and_a_video()
    with pytest.raises(ValueError, match="2 image and 1 video placeholder"):
        build_multimodal_prompt(prompt, images[:1], videos, ids=IDS, encode_text=_encode_text)
    with pytest.raises(ValueError, match="tokenizer"):
        build_multimodal_prompt(prompt, images, videos, ids=IDS)
    with pytest.raises(ValueError, match="shorter than its"):
        mrope_positions([IMAGE_ID] * 5, [_image(4, 6)], IDS)
    with pytest.raises(ValueError, match="more media items"):
        mrope_positions([1, 2], [_image(4, 6)], IDS)

"""Image parts of chat messages become an expanded multimodal prompt (the server side of vision input)."""

from __future__ import annotations

import base64
import io
from types import SimpleNamespace

import PIL.Image
import pytest

from fp4serve.model.media import MediaConfig
from fp4serve.model.multimodal import VisionTokenIds
from fp4serve.server.chat import render_chat
from fp4serve.server.errors import APIError
from fp4serve.server.media import collect_media, multimodal_input
from fp4serve.server.protocol import ChatMessage


def png_data_url(width: int, height: int) -> str:
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_images_expand_in_prompt_order(base_state):
    first, second = png_data_url(64, 64), png_data_url(128, 64)
    messages = [
        ChatMessage(role="user", content=[
            {"type": "image_url", "image_url": {"url": first}},
            {"type": "text", "text": "and"},
            {"type": "image_url", "image_url": {"url": second}},
        ]),
    ]  # fmt: skip
    images, videos = collect_media(messages)
    assert images == [first, second] and videos == []
    rendered = render_chat(base_state.template, messages, tools=None, tool_choice="none", add_generation_prompt=True,
                           continue_final_message=False, template_kwargs={})  # fmt: skip
    ids = VisionTokenIds()
    prompt_ids = base_state.tokenizer.encode(rendered.prompt)
    assert prompt_ids.count(ids.image) == 2
    state = SimpleNamespace(media_config=MediaConfig(image_min_pixels=64 * 64), vision_ids=ids,
                            tokenizer=base_state.tokenizer, settings=base_state.settings)  # fmt: skip
    mm = multimodal_input(state, prompt_ids, images, videos)
    # 64x64 -> 4x4 patches of 16 -> 4 merged tokens; 128x64 -> 8 merged tokens
    assert mm.token_ids.count(ids.image) == 4 + 8
    assert [tuple(g) for g in mm.grid_thw.tolist()] == [(1, 4, 4), (1, 4, 8)]
    assert mm.positions.shape == (3, len(mm.token_ids))


def test_media_errors_are_400(base_state):
    state = SimpleNamespace(media_config=MediaConfig(), vision_ids=VisionTokenIds(), tokenizer=base_state.tokenizer,
                            settings=base_state.settings)  # fmt: skip
    with pytest.raises(APIError, match="disabled on this server") as info:
        multimodal_input(state, [VisionTokenIds().image], ["http://example.com/cat.png"], [])
    assert info.value.status == 400
    with pytest.raises(APIError, match="needs a URL"):
        collect_media([ChatMessage(role="user", content=[{"type": "image_url", "image_url": {}}])])

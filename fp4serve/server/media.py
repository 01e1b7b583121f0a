"""Images and videos in chat messages: collect them in prompt order and turn them into the engine's input.

The chat template puts one placeholder per image/video where the part sits in the message; this module finds the
same parts in the same order (the template's own test: a part with an `image`/`image_url` key or type `image` is an
image, `video`/`video_url` or type `video` a video), loads and preprocesses them with `fp4serve.model.media` and
expands the rendered prompt with `build_multimodal_prompt`. Loading rules (data URLs always; http(s) only with
`--allow-http-media`) are the media module's. A model without a vision tower refuses media with a 400.
"""

from __future__ import annotations

from typing import Any

from fp4serve.server.errors import bad_request
from fp4serve.server.protocol import ChatMessage

UNSUPPORTED_PARTS = ("input_audio", "audio_url", "image_embeds")


def _source(value: Any, key: str) -> str:
    if isinstance(value, dict):
        value = value.get("url")
    if not isinstance(value, str) or not value:
        raise bad_request(f"a `{key}` content part needs a URL string (data:, http(s) or file)")
    return value


def collect_media(messages: list[ChatMessage]) -> tuple[list[str], list[str]]:
    """(image sources, video sources), each in the order the template places their placeholders."""
    images: list[str] = []
    videos: list[str] = []
    for message in messages:
        if not isinstance(message.content, list):
            continue
        for part in message.content:
            kind = part.get("type")
            if kind in UNSUPPORTED_PARTS:
                raise bad_request(f"content parts of type `{kind}` are not supported by this model")
            if "image_url" in part or "image" in part or kind == "image":
                key = "image_url" if "image_url" in part else "image"
                images.append(_source(part.get(key), key))
            elif "video_url" in part or "video" in part or kind == "video":
                key = "video_url" if "video_url" in part else "video"
                videos.append(_source(part.get(key), key))
    return images, videos


def multimodal_input(state: Any, prompt_ids: list[int], images: list[str], videos: list[str]) -> Any:
    """A `MultimodalPrompt` (expanded token ids, MRoPE positions, pixel values) for the engine."""
    if state.media_config is None:
        raise bad_request(
            f"the model `{state.settings.model_name}` has no vision tower: image and video parts are not supported"
        )
    from fp4serve.model.media import image_item, video_item
    from fp4serve.model.multimodal import build_multimodal_prompt

    cfg = state.media_config
    try:
        image_items = [image_item(source, cfg) for source in images]
        video_items = [video_item(source, cfg) for source in videos]
        return build_multimodal_prompt(
            prompt_ids,
            image_items,
            video_items,
            ids=state.vision_ids,
            encode_text=state.tokenizer.encode,
            merge_size=cfg.merge_size,
        )
    except ValueError as exc:
        raise bad_request(str(exc), param="messages") from exc

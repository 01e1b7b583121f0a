"""Images and videos in chat messages: collect them in prompt order and turn them into the engine's input.

The chat template puts one placeholder per image/video where the part sits in the message; this module finds the
same parts in the same order (the template's own test: a part with an `image`/`image_url` key or type `image` is an
image, `video`/`video_url` or type `video` a video), loads and preprocesses them with `fp4serve.model.media` and
expands the rendered prompt with `build_multimodal_prompt`. Loading rules (data URLs always; local files only under
`--allowed-local-media-path`; http(s) only with `--allow-http-media`) and the size limits are the media module's.

Every bad input is a 400 naming the problem: a part type other than text/image/video, a model without a vision
tower, an unreadable, corrupt or oversized image. Images are decoded first and their token counts taken from the
resize rule before the expensive resize/patchify, so a prompt whose images cannot fit the context is refused early
with vLLM's prompt-too-long message (the same text the final length check would give).
"""

from __future__ import annotations

from typing import Any

from fp4serve.server.errors import bad_request
from fp4serve.server.params import too_long_error
from fp4serve.server.protocol import ChatMessage

UNSUPPORTED_PARTS = ("input_audio", "audio_url", "image_embeds")
# part types the template renders: text, images, videos (plus the HF-style `image`/`video` spellings)
SUPPORTED_PARTS = (None, "text", "image_url", "video_url", "image", "video")


def _source(value: Any, key: str) -> str:
    if isinstance(value, dict):
        value = value.get("url")
    if not isinstance(value, str) or not value:
        raise bad_request(f"a `{key}` content part needs a URL string (data:, http(s) or file)", param="messages")
    return value


def _video_source(value: Any, key: str) -> str | list[str]:
    """A video URL, or (qwen-vl-utils style) a list of frame image URLs taken as sampled at the video fps."""
    frames = value.get("url") if isinstance(value, dict) else value
    if isinstance(frames, list) and frames:
        return [_source(frame, key) for frame in frames]
    return _source(value, key)


def media_kind(part: dict[str, Any]) -> str | None:
    """ "image", "video" or None (text), by the chat template's own test; unsupported part types are a 400."""
    kind = part.get("type")
    if kind in UNSUPPORTED_PARTS:
        raise bad_request(f"content parts of type `{kind}` are not supported by this model", param="messages")
    if kind not in SUPPORTED_PARTS:
        raise bad_request(
            f"unknown content part type `{kind}`; supported: text, image_url, video_url", param="messages"
        )
    if "image_url" in part or "image" in part or kind == "image":
        return "image"
    if "video_url" in part or "video" in part or kind == "video":
        return "video"
    return None


def placeholder_parts(content: Any) -> Any:
    """Message content for the template: each image/video part becomes a bare `{"type": "image"|"video"}` (as vLLM
    hands them over), so `video_url` parts render and no media payload goes through the template."""
    if not isinstance(content, list):
        return content
    out = []
    for part in content:
        kind = media_kind(part) if isinstance(part, dict) else None
        out.append({"type": kind} if kind is not None else part)
    return out


def collect_media(messages: list[ChatMessage]) -> tuple[list[str], list[str | list[str]]]:
    """(image sources, video sources), each in the order the template places their placeholders."""
    images: list[str] = []
    videos: list[str | list[str]] = []
    for message in messages:
        if not isinstance(message.content, list):
            continue
        for part in message.content:
            kind = media_kind(part)
            if kind == "image":
                key = "image_url" if "image_url" in part else "image"
                images.append(_source(part.get(key), key))
            elif kind == "video":
                key = "video_url" if "video_url" in part else "video"
                videos.append(_video_source(part.get(key), key))
    return images, videos


def multimodal_input(
    state: Any,
    prompt_ids: list[int],
    images: list[str],
    videos: list[str | list[str]],
    *,
    max_model_len: int | None = None,
    max_new_tokens: int | None = None,
) -> Any:
    """A `MultimodalPrompt` (expanded token ids, MRoPE positions, pixel values) for the engine.

    With `max_model_len`, an image prompt that cannot fit (with `max_new_tokens`) is refused before preprocessing.
    Heavy (decode, resize, patchify): the chat route runs it off the event loop.
    """
    if state.media_config is None:
        raise bad_request(
            f"the model `{state.settings.model_name}` has no vision tower: image and video parts are not supported",
            param="messages",
        )
    from fp4serve.model.media import image_token_count, load_image, preprocess_image, video_item
    from fp4serve.model.multimodal import build_multimodal_prompt

    cfg = state.media_config
    try:
        pictures = [load_image(source, cfg) for source in images]
        if max_model_len is not None and not videos:
            # one pad in the rendered prompt becomes image_token_count(...) pads
            expanded = len(prompt_ids) + sum(image_token_count(p, cfg) - 1 for p in pictures)
            requested = max(max_new_tokens or 0, 0)
            if expanded + requested > max_model_len:
                raise too_long_error(max_model_len, requested, expanded)
        image_items = [preprocess_image(picture, cfg) for picture in pictures]
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

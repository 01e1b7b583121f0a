"""Images (and frame-list videos) over the real HTTP API, on the tiny NVFP4-text / BF16-vision checkpoint.

The server is the real app (`build_state` → uvicorn in a thread) around an engine loaded with
`Engine.from_pretrained`; requests go through the official `openai` client. Every bad input must come back as a
400 with an OpenAI-style error body, and the server must keep serving afterwards.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import requests
from mm_harness import data_url, random_image, start_server
from openai import OpenAI

from fp4serve.chat_template import ChatTemplate
from fp4serve.config import EngineConfig
from fp4serve.server.errors import APIError
from fp4serve.server.launch import build_state
from fp4serve.server.media import multimodal_input
from fp4serve.server.settings import ServerSettings
from fp4serve.server.state import ServerState

MODEL = "tiny-mm"
MAX_MODEL_LEN = 512


def engine_config() -> EngineConfig:
    return EngineConfig.create(device="cpu", max_num_seqs=4, kv_cache_memory_bytes="64MiB", max_model_len=MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("media")
    allowed = root / "allowed"
    allowed.mkdir()
    random_image(300, 200, seed=7).save(allowed / "picture.png")
    random_image(64, 64, seed=8).save(root / "outside.png")
    return root


@pytest.fixture(scope="module")
def server(checkpoints, media_dir):
    settings = ServerSettings(
        served_model_names=(MODEL,),
        model_root=str(checkpoints.nvfp4),
        allowed_local_media_path=str(media_dir / "allowed"),
        version="test",
    )
    state = build_state(checkpoints.nvfp4, settings, engine_config())
    live = start_server(state)
    yield live
    live.stop()
    state.engine.shutdown()


@pytest.fixture(scope="module")
def strict_server(server):
    """Same engine, tight media limits: 6000 bytes per image, 40000 source pixels."""
    s = server.state
    limits = replace(s.media_config, max_media_bytes=6000, max_source_pixels=40000)
    state = ServerState(s.settings, s.engine, s.tokenizer, s.template, s.generation_config, s.max_model_len,
                        s.vocab_size, media_config=limits, vision_ids=s.vision_ids)  # fmt: skip
    live = start_server(state)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def text_server(checkpoints, tmp_path_factory):
    """The same weights as a text-only model: config.json without vision_config."""
    path = tmp_path_factory.mktemp("text_only") / "model"
    shutil.copytree(checkpoints.nvfp4, path)
    config = json.loads((path / "config.json").read_text())
    del config["vision_config"]
    (path / "config.json").write_text(json.dumps(config))
    settings = ServerSettings(served_model_names=(MODEL,), model_root=str(path), version="test")
    state = build_state(path, settings, engine_config())
    assert state.media_config is None
    live = start_server(state)
    yield live
    live.stop()
    state.engine.shutdown()


def client(live) -> OpenAI:
    return OpenAI(base_url=f"{live.url}/v1", api_key="none", max_retries=0)


def user(*parts: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": list(parts)}]


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def text_prompt_tokens(state, content: list[dict[str, Any]]) -> int:
    """Tokens of the rendered prompt with one pad per image (what the template emits before expansion)."""
    template: ChatTemplate = state.template
    text = template.render([{"role": "user", "content": content}], add_generation_prompt=True)
    return len(state.tokenizer.encode(text))


def post_chat(live, messages: list[dict[str, Any]], **extra: Any) -> requests.Response:
    body = {"model": MODEL, "messages": messages, "max_tokens": 2, "temperature": 0} | extra
    return requests.post(f"{live.url}/v1/chat/completions", json=body, timeout=60)


def test_base64_image_chat_streaming_and_not(server):
    # 300x200 → smart_resize 288x192 → 9x6 merged tokens
    image = random_image(300, 200, seed=5)
    messages = user({"type": "text", "text": "What is in this picture?"}, image_part(data_url(image)))
    expected_prompt = text_prompt_tokens(server.state, [{"type": "text", "text": "What is in this picture?"},
                                                        {"type": "image"}]) + 54 - 1  # fmt: skip
    api = client(server)
    full = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0, logprobs=True)
    assert full.usage.prompt_tokens == expected_prompt
    assert full.usage.completion_tokens == 4 and full.choices[0].finish_reason == "length"
    content = full.choices[0].message.content or ""

    stream = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0, stream=True,
                                         stream_options={"include_usage": True})  # fmt: skip
    text, usage, reasons = "", None, []
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            if choice.finish_reason:
                reasons.append(choice.finish_reason)
    assert text == content and reasons == ["length"]
    assert usage.prompt_tokens == expected_prompt and usage.completion_tokens == 4

    # the pixels reach the model: another image, same prompt length, different first-token logprob
    other = user({"type": "text", "text": "What is in this picture?"}, image_part(data_url(random_image(300, 200, 6))))
    again = api.chat.completions.create(model=MODEL, messages=other, max_tokens=1, temperature=0, logprobs=True)
    assert again.usage.prompt_tokens == expected_prompt
    assert again.choices[0].logprobs.content[0].logprob != pytest.approx(full.choices[0].logprobs.content[0].logprob)


def test_tokenize_counts_expanded_image_pads_like_the_chat_route(server):
    image = random_image(300, 200, seed=5)
    messages = user({"type": "text", "text": "What is in this picture?"}, image_part(data_url(image)))
    body = {"model": MODEL, "messages": messages}
    tokens = requests.post(f"{server.url}/tokenize", json=body, timeout=60).json()
    chat = post_chat(server, messages).json()
    assert tokens["count"] == len(tokens["tokens"]) == chat["usage"]["prompt_tokens"]
    assert tokens["tokens"].count(server.state.tokenizer.token_to_id("<|image_pad|>")) == 54


def test_local_files_only_under_the_allowed_path(server, media_dir):
    picture = media_dir / "allowed" / "picture.png"
    expected = text_prompt_tokens(server.state, [{"type": "image"}]) + 54 - 1
    for url in (f"file://{picture}", str(picture)):
        response = post_chat(server, user(image_part(url)))
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["prompt_tokens"] == expected
    response = post_chat(server, user(image_part(f"file://{media_dir / 'outside.png'}")))
    assert response.status_code == 400
    assert "outside the allowed local media path" in response.json()["error"]["message"]


def test_video_as_frame_list(server):
    frames = [data_url(random_image(64, 64, seed=20 + i)) for i in range(4)]
    messages = user({"type": "video_url", "video_url": {"url": frames}}, {"type": "text", "text": "What happens?"})
    response = post_chat(server, messages)
    assert response.status_code == 200, response.text
    # 4 frames of 64x64 → 2 temporal patches of 2x2 merged tokens, each framed by a timestamp and start/end markers
    base = text_prompt_tokens(server.state, [{"type": "video"}, {"type": "text", "text": "What happens?"}])
    stamps = sum(len(server.state.tokenizer.encode(f"<{t:.1f} seconds>")) for t in (0.25, 1.25))
    assert response.json()["usage"]["prompt_tokens"] == base - 3 + stamps + 2 * (1 + 4 + 1)


def png_bytes(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    random_image(width, height, seed=1).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


BAD_INPUTS = {
    "corrupt image": (user(image_part(b64(b"definitely not an image" * 10))), "unreadable image"),
    "truncated image": (user(image_part(b64(png_bytes(64, 64)[:300]))), "unreadable image"),
    "bad base64": (user(image_part("data:image/png;base64,@@@@")), "not valid base64"),
    "not a data url": (user(image_part("data:image/png,rawbytes")), "data URL must look like"),
    "http disabled": (user(image_part("http://example.com/cat.png")), "disabled on this server"),
    "audio part": (user({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}), "not supported"),
    "unknown part": (user({"type": "hologram", "hologram": {}}), "unknown content part type `hologram`"),
    "image without url": (user({"type": "image_url", "image_url": {}}), "needs a URL"),
    "image in system": (
        [{"role": "system", "content": [image_part(b64(png_bytes(32, 32)))]}, {"role": "user", "content": "hi"}],
        "System message cannot contain images.",
    ),  # fmt: skip
    "too many images": (
        user(*[image_part(b64(png_bytes(256, 256)))] * 9),
        f"This model's maximum context length is {MAX_MODEL_LEN} tokens. However, you requested 2 "
        "output tokens and your prompt contains",
    ),  # fmt: skip
    "image plus max_tokens too long": (user(image_part(b64(png_bytes(256, 256)))), "maximum context"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_media_input_is_a_400(server, case):
    messages, needle = BAD_INPUTS[case]
    extra = {"max_tokens": 470} if case.startswith("image plus") else {}
    response = post_chat(server, messages, **extra)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "BadRequestError" and error["code"] == 400
    assert needle in error["message"], error["message"]
    if "context" in needle:
        assert error["param"] == "input_tokens"


def test_oversized_images_are_a_400(strict_server):
    big_bytes = post_chat(strict_server, user(image_part(b64(png_bytes(100, 100)))))
    assert big_bytes.status_code == 400 and "over the limit of 6000" in big_bytes.json()["error"]["message"]
    buffer = io.BytesIO()
    random_image(400, 200).convert("L").point(lambda _: 0).save(buffer, format="PNG")  # tiny file, 80000 pixels
    big_pixels = post_chat(strict_server, user(image_part(b64(buffer.getvalue()))))
    assert big_pixels.status_code == 400, big_pixels.text
    assert "400x200 pixels, over the limit of 40000" in big_pixels.json()["error"]["message"]


def test_text_only_model_refuses_images(text_server):
    response = post_chat(text_server, user(image_part(b64(png_bytes(32, 32)))))
    assert response.status_code == 400
    assert "has no vision tower" in response.json()["error"]["message"]
    assert post_chat(text_server, [{"role": "user", "content": "hi"}]).status_code == 200


def test_server_still_healthy_after_bad_input(server):
    assert requests.get(f"{server.url}/health", timeout=10).status_code == 200
    response = post_chat(server, user(image_part(b64(png_bytes(64, 32)))))
    assert response.status_code == 200, response.text


def test_early_length_check_counts_exactly_what_expansion_gives(server):
    """The pre-resize token count (image sizes only) equals the expanded prompt's length."""
    state = server.state
    sources = [b64(png_bytes(w, h)) for w, h in ((300, 200), (40, 90), (640, 480))]
    prompt_ids = state.tokenizer.encode("<|vision_start|><|image_pad|><|vision_end|>" * 3)
    expanded = multimodal_input(state, prompt_ids, sources, []).num_tokens
    assert multimodal_input(state, prompt_ids, sources, [], max_model_len=expanded).num_tokens == expanded
    with pytest.raises(APIError, match=f"your prompt contains {expanded} input tokens") as info:
        multimodal_input(state, prompt_ids, sources, [], max_model_len=expanded, max_new_tokens=1)
    assert info.value.param == "input_tokens"


def test_allowed_local_media_path_must_be_a_directory(tmp_path):
    with pytest.raises(ValueError, match="is not a directory"):
        ServerSettings(served_model_names=(MODEL,), model_root=".", allowed_local_media_path=str(tmp_path / "none"))

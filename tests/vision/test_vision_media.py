"""Image/video preprocessing against transformers' Qwen3.5 processors, and the media loading rules."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

from fp4serve.model.media import (
    MediaConfig,
    image_item,
    load_image,
    load_video,
    preprocess_image,
    preprocess_video,
    smart_resize,
    video_item,
)

BIG = 16777216


def _hf_image_processor(min_pixels: int, max_pixels: int):
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, patch_size=16, temporal_patch_size=2,
        merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
    )


@pytest.mark.parametrize(
    ("height", "width", "min_pixels", "max_pixels"),
    [
        (100, 150, 65536, BIG),  # upscaled to the min-pixel floor
        (20, 20, 65536, BIG),  # tiny
        (40, 3000, 65536, BIG),  # very wide
        (3000, 41, 65536, BIG),  # very tall
        (1000, 700, 65536, 300000),  # capped by max pixels
        (333, 517, 4096, 200000),  # odd sizes, plain rounding
        (64, 64, 4096, BIG),  # already a multiple of 32: no resize
    ],
)
def test_image_matches_transformers(height, width, min_pixels, max_pixels):
    rng = np.random.default_rng(height * 7 + width)
    image = PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    ref = _hf_image_processor(min_pixels, max_pixels)(images=[image], return_tensors="pt")
    item = preprocess_image(image, MediaConfig(image_min_pixels=min_pixels, image_max_pixels=max_pixels))
    assert [list(item.grid_thw)] == ref["image_grid_thw"].tolist()
    assert item.pixel_values.shape == ref["pixel_values"].shape
    torch.testing.assert_close(item.pixel_values, ref["pixel_values"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["RGBA", "L", "P"])
def test_image_modes_match_transformers(mode):
    rng = np.random.default_rng(5)
    rgba = PIL.Image.fromarray(rng.integers(0, 256, (70, 90, 4), dtype=np.uint8), "RGBA")
    image = rgba if mode == "RGBA" else rgba.convert(mode)
    ref = _hf_image_processor(4096, BIG)(images=[image], return_tensors="pt")
    item = preprocess_image(image, MediaConfig(image_min_pixels=4096))
    torch.testing.assert_close(item.pixel_values, ref["pixel_values"], atol=1e-6, rtol=0)


def test_smart_resize_rejects_extreme_aspect_ratio():
    with pytest.raises(ValueError, match="aspect ratio 250.0 is over the limit of 200"):
        smart_resize(10, 2500, 32, 65536, BIG)


def _hf_video_processor(monkeypatch):
    """transformers' Qwen3VLVideoProcessor with its two torchvision calls replaced by their CPU equivalents.

    torchvision is not installed here. On CPU, torchvision's resize of a uint8 video with bicubic + antialias is a
    direct `interpolate(uint8, mode="bicubic", align_corners=False, antialias=True)` (native uint8 path, no-op when
    the size is unchanged), and `normalize` is `(x - mean) / std`. Everything else (frame sampling, the smart_resize
    and per-frame cap arithmetic, temporal padding, patchify, metadata) runs as shipped.
    """
    from transformers.image_processing_backends import TorchvisionBackend
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    def resize(self, image, size, resample=None, antialias=True, **kwargs):
        if tuple(image.shape[-2:]) == (size.height, size.width):
            return image
        flat = image.reshape(-1, *image.shape[-3:])
        out = F.interpolate(flat, size=(size.height, size.width), mode="bicubic", align_corners=False,
                            antialias=antialias)
        return out.reshape(*image.shape[:-2], size.height, size.width)

    def normalize(self, image, mean, std, inplace=False, **kwargs):
        mean = torch.as_tensor(mean, dtype=image.dtype).view(-1, 1, 1)
        std = torch.as_tensor(std, dtype=image.dtype).view(-1, 1, 1)
        return (image - mean) / std

    monkeypatch.setattr(TorchvisionBackend, "resize", resize)
    monkeypatch.setattr(TorchvisionBackend, "normalize", normalize)
    return Qwen3VLVideoProcessor(size={"shortest_edge": 4096, "longest_edge": 25165824}, image_mean=[0.5] * 3,
                                 image_std=[0.5] * 3, do_convert_rgb=False)


@pytest.mark.parametrize(
    ("frames", "height", "width", "fps", "cap"),
    [
        (9, 60, 90, 4.0, True),  # sampled down to 2 fps, upscaled
        (5, 40, 30, None, True),  # pre-sampled frames, odd count → last frame repeated
        (30, 300, 200, 10.0, False),  # uncapped budget
        (7, 20, 50, 2.0, True),  # a side below 32 px
    ],
)
def test_video_matches_transformers(monkeypatch, frames, height, width, fps, cap):
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.video_utils import VideoMetadata

    proc = _hf_video_processor(monkeypatch)
    video = np.random.default_rng(frames).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)
    kwargs = dict(return_metadata=True, cap_pixels_per_frame=cap, return_tensors="pt")
    if fps is None:
        ref = proc(videos=[video], do_sample_frames=False, **kwargs)
        indices, rate = list(range(frames)), 2.0
    else:
        meta = VideoMetadata(total_num_frames=frames, fps=fps, width=width, height=height)
        ref = proc(videos=[video], video_metadata=[meta], do_sample_frames=True, **kwargs)
        indices, rate = ref["video_metadata"][0].frames_indices, fps
    item = preprocess_video(list(video), MediaConfig(video_cap_pixels_per_frame=cap), fps=fps)
    assert [list(item.grid_thw)] == ref["video_grid_thw"].tolist()
    torch.testing.assert_close(item.pixel_values, ref["pixel_values_videos"], atol=1e-6, rtol=0)
    expected = Qwen3VLProcessor._calculate_timestamps(None, list(indices), rate, 2)
    assert item.timestamps == pytest.approx(expected)


def test_video_cap_limits_tokens_per_frame():
    video = np.zeros((2, 1080, 1920, 3), dtype=np.uint8)
    capped = preprocess_video(video, MediaConfig())
    uncapped = preprocess_video(video, MediaConfig(video_cap_pixels_per_frame=False))
    assert capped.grid_thw[1] * capped.grid_thw[2] // 4 <= 768
    assert uncapped.grid_thw[1] * uncapped.grid_thw[2] > capped.grid_thw[1] * capped.grid_thw[2]


def _encode(image: PIL.Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def _data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_data_url_images_decode(fmt):
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    loaded = load_image(_data_url(_encode(image, fmt)), MediaConfig())
    assert loaded.size == (50, 40)
    if fmt == "PNG":
        assert np.array_equal(np.asarray(loaded.convert("RGB")), np.asarray(image))
        item = image_item(_data_url(_encode(image, fmt)), MediaConfig())
        torch.testing.assert_close(item.pixel_values, preprocess_image(image, MediaConfig()).pixel_values)


def test_bad_images_give_clear_errors(tmp_path):
    cfg = MediaConfig(max_media_bytes=10_000)
    with pytest.raises(ValueError, match="not valid base64"):
        load_image("data:image/png;base64,@@@@", cfg)
    with pytest.raises(ValueError, match="unreadable image"):
        load_image(_data_url(b"definitely not an image"), cfg)
    with pytest.raises(ValueError, match="over the limit of 10000"):
        load_image(_data_url(bytes(20_000)), cfg)
    with pytest.raises(ValueError, match="http"):
        load_image("https://example.com/cat.png", cfg)
    with pytest.raises(ValueError, match="unsupported image URL scheme"):
        load_image("ftp://example.com/cat.png", cfg)
    big = PIL.Image.new("L", (5000, 5000))
    with pytest.raises(ValueError, match="over the limit of 1000000"):
        load_image(_encode(big, "PNG"), MediaConfig(max_source_pixels=1_000_000))


def test_local_files_only_under_the_allowed_path(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    image = PIL.Image.new("RGB", (8, 6), (10, 20, 30))
    (media / "a.png").write_bytes(_encode(image, "PNG"))
    (tmp_path / "secret.png").write_bytes(_encode(image, "PNG"))
    with pytest.raises(ValueError, match="not allowed"):
        load_image(str(media / "a.png"), MediaConfig())
    cfg = MediaConfig(allowed_local_media_path=str(media))
    assert load_image(str(media / "a.png"), cfg).size == (8, 6)
    assert load_image(f"file://{media / 'a.png'}", cfg).size == (8, 6)
    with pytest.raises(ValueError, match="outside the allowed"):
        load_image(str(media / ".." / "secret.png"), cfg)
    with pytest.raises(ValueError, match="does not exist"):
        load_image(str(media / "b.png"), cfg)


def test_video_sources():
    frame = _data_url(_encode(PIL.Image.new("RGB", (64, 48), (1, 2, 3)), "PNG"))
    item = video_item([frame] * 4, MediaConfig(), fps=2.0)
    assert item.grid_thw[0] == 2 and item.timestamps == pytest.approx((0.25, 1.25))
    assert item.pixel_values[:, 0].unique().tolist() == pytest.approx([(1 / 255 - 0.5) / 0.5])
    try:
        import av  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="needs PyAV"):
            load_video(_data_url(b"\x00" * 64, "video/mp4"), MediaConfig())
    with pytest.raises(ValueError, match="at least 2 are needed"):
        preprocess_video([PIL.Image.new("RGB", (64, 64))], MediaConfig())
    with pytest.raises(ValueError, match="differ in size"):
        preprocess_video([PIL.Image.new("RGB", (64, 64)), PIL.Image.new("RGB", (32, 64))], MediaConfig())


def test_config_from_checkpoint_dir(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 1024, "longest_edge": 4096}, "patch_size": 16, "image_mean": [0.1, 0.2, 0.3]}))
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 2048, "longest_edge": 8192}, "fps": 1, "max_frames": 16}))
    cfg = MediaConfig.from_dir(tmp_path, allow_http=True)
    assert (cfg.image_min_pixels, cfg.image_max_pixels, cfg.image_mean) == (1024, 4096, (0.1, 0.2, 0.3))
    assert (cfg.video_min_pixels, cfg.video_max_pixels, cfg.video_fps, cfg.video_max_frames) == (2048, 8192, 1.0, 16)
    assert cfg.allow_http and MediaConfig.from_dir(tmp_path / "missing") == MediaConfig()

"""Image and video input for the vision tower: fetch/decode, `smart_resize`, normalise, patchify.

Output per item: float32 patch rows `[t·h·w, C·T·P·P]` in the tower's row order (temporal patches outermost, then 2×2
merge blocks row-major, then the block's four patches; each row laid out as (channel, temporal, y, x)) plus the grid
`(t, h, w)` in patches, and for videos the timestamp (seconds) of each temporal patch for the prompt text.

Reference behaviour (what the tests compare against):
- Images follow transformers' PIL image processor (Qwen2VLImageProcessorPil, Qwen3.5's preprocessor_config):
  alpha composited onto white, PIL bicubic resize of the uint8 image to the smart_resize size, `(p/255 − mean)/std`,
  the single frame duplicated into both temporal slots.
- Videos follow Qwen3VLVideoProcessor on CPU: frames sampled at `fps` (2/s) clamped to [min_frames, max_frames] and
  to the clip, a bicubic antialiased `torch` resize of the uint8 frames (what torchvision does on CPU), frame count
  padded to even with the last frame. Frame budget: we mimic the reference (qwen-vl-utils) per-frame cap that
  transformers exposes as `cap_pixels_per_frame=True`: each frame may use at most
  `min(max_tokens_per_frame·32², longest_edge / num_frames)` pixels (floored at 1.05·shortest_edge), so a short clip
  does not spend the whole 24M-pixel video budget on a handful of near-native frames. `video_cap_pixels_per_frame`
  turns it off (transformers' current uncapped default).

Sources: PIL images / numpy arrays (in-process callers), `data:` URLs (base64), local files only under an explicitly
allowed directory, http(s) URLs only when `allow_http` is set (a server may have no network, and fetching arbitrary
URLs is an SSRF risk). Bad input raises ValueError naming the problem.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import urllib.parse
import urllib.request
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
_MAX_ASPECT_RATIO = 200


@dataclass(frozen=True)
class MediaConfig:
    """Preprocessing knobs; defaults are Qwen3.5's preprocessor_config.json / video_preprocessor_config.json."""

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_min_pixels: int = 65536
    image_max_pixels: int = 16777216
    video_min_pixels: int = 4096
    video_max_pixels: int = 25165824
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    video_fps: float = 2.0
    video_min_frames: int = 4
    video_max_frames: int = 768
    video_cap_pixels_per_frame: bool = True
    video_max_tokens_per_frame: int = 768
    # loading limits and permissions
    allow_http: bool = False
    allowed_local_media_path: str | None = None
    max_media_bytes: int = 64 << 20
    max_source_pixels: int = 89_478_485
    http_timeout_s: float = 10.0

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_dir(cls, path: str | Path, **overrides) -> MediaConfig:
        """Defaults updated from a checkpoint's preprocessor_config.json and video_preprocessor_config.json."""
        path = Path(path)
        kw: dict = {}
        for fname, prefix in (("preprocessor_config.json", "image"), ("video_preprocessor_config.json", "video")):
            f = path / fname
            if not f.is_file():
                continue
            d = json.loads(f.read_text())
            size = d.get("size") or {}
            lo = size.get("shortest_edge", d.get("min_pixels"))
            hi = size.get("longest_edge", d.get("max_pixels"))
            if lo is not None:
                kw[f"{prefix}_min_pixels"] = int(lo)
            if hi is not None:
                kw[f"{prefix}_max_pixels"] = int(hi)
            for key in ("patch_size", "temporal_patch_size", "merge_size"):
                if key in d:
                    kw[key] = int(d[key])
            if prefix == "image":
                for key in ("image_mean", "image_std"):
                    if key in d:
                        kw[key] = tuple(float(v) for v in d[key])
            else:
                for key, name in (("fps", "video_fps"), ("min_frames", "video_min_frames"),
                                  ("max_frames", "video_max_frames")):
                    if d.get(key) is not None:
                        kw[name] = type(getattr(cls, name))(d[key])
        return replace(cls(), **{**kw, **overrides})


@dataclass(frozen=True)
class MediaItem:
    """One preprocessed image or video, ready for the vision tower."""

    kind: str  # "image" | "video"
    pixel_values: torch.Tensor  # [t·h·w, C·T·P·P] float32
    grid_thw: tuple[int, int, int]  # in patches
    timestamps: tuple[float, ...] = field(default=())  # video: seconds of each temporal patch

    def num_tokens(self, merge_size: int = 2) -> int:
        t, h, w = self.grid_thw
        return t * h * w // merge_size**2


@dataclass(frozen=True)
class VideoClip:
    """Decoded frames (uint8 [T, H, W, 3] or a list of images) and their frame rate, if known."""

    frames: np.ndarray | list
    fps: float | None = None


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Target (h, w): multiples of `factor`, area within [min_pixels, max_pixels], aspect ratio kept."""
    if min(height, width) < 1:
        raise ValueError(f"image has an empty side ({width}x{height})")
    if max(height, width) / min(height, width) > _MAX_ASPECT_RATIO:
        raise ValueError(f"image aspect ratio {max(height, width) / min(height, width):.1f} is over the limit "
                         f"of {_MAX_ASPECT_RATIO} ({width}x{height})")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def smart_resize_video(
    num_frames: int, height: int, width: int, factor: int, temporal_factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """Video variant: the pixel budget counts all frames; sides below `factor` are first scaled up."""
    if num_frames < temporal_factor:
        raise ValueError(f"video has {num_frames} frame(s); at least {temporal_factor} are needed")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > _MAX_ASPECT_RATIO:
        raise ValueError(f"video aspect ratio {max(height, width) / min(height, width):.1f} is over the limit "
                         f"of {_MAX_ASPECT_RATIO}")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    t = round(num_frames / temporal_factor) * temporal_factor
    if t * h * w > max_pixels:
        beta = math.sqrt(num_frames * height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif t * h * w < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def _patchify(frames: torch.Tensor, cfg: MediaConfig) -> torch.Tensor:
    """[T, C, H, W] (T a multiple of temporal_patch_size) → [T/tp · H/P · W/P, C·tp·P·P] in the tower's row order."""
    n, c, hh, ww = frames.shape
    p, m, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    gh, gw = hh // p, ww // p
    x = frames.reshape(n // tp, tp, c, gh // m, m, p, gw // m, m, p)
    # (t', block row, block col, row in block, col in block | channel, temporal, y, x)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(n // tp * gh * gw, c * tp * p * p).contiguous()


def _normalize(frames_u8: torch.Tensor, cfg: MediaConfig) -> torch.Tensor:
    """uint8 [T, C, H, W] → float32 `(p/255 − mean)/std`."""
    mean = torch.tensor(cfg.image_mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(cfg.image_std, dtype=torch.float32).view(1, -1, 1, 1)
    return (frames_u8.float() * (1.0 / 255.0) - mean) / std


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """RGB copy; transparency is composited onto a white background (as transformers does)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def preprocess_image(image: PIL.Image.Image | np.ndarray, cfg: MediaConfig) -> MediaItem:
    """One image → MediaItem with grid (1, h/P, w/P)."""
    image = to_rgb(_as_pil(image))
    h, w = smart_resize(image.height, image.width, cfg.factor, cfg.image_min_pixels, cfg.image_max_pixels)
    if (image.height, image.width) != (h, w):
        image = image.resize((w, h), resample=PIL.Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)  # [3, h, w] uint8
    frames = _normalize(pixels[None], cfg).expand(cfg.temporal_patch_size, -1, -1, -1)
    grid = (1, h // cfg.patch_size, w // cfg.patch_size)
    return MediaItem("image", _patchify(frames, cfg), grid)


def image_token_count(image: PIL.Image.Image, cfg: MediaConfig) -> int:
    """Placeholder tokens the image will take (after smart_resize and the 2×2 merge), without resizing it."""
    h, w = smart_resize(image.height, image.width, cfg.factor, cfg.image_min_pixels, cfg.image_max_pixels)
    return (h // cfg.factor) * (w // cfg.factor)


def sample_frame_indices(total: int, source_fps: float | None, cfg: MediaConfig) -> list[int]:
    """Uniformly spaced frame indices at `cfg.video_fps`, clamped to [min_frames, max_frames] and to the clip."""
    if source_fps is None:
        return list(range(total))
    n = int(total / source_fps * cfg.video_fps)
    n = min(max(n, cfg.video_min_frames), cfg.video_max_frames, total)
    return np.linspace(0, total - 1, n).round().astype(int).tolist()


def preprocess_video(frames: np.ndarray | torch.Tensor | list, cfg: MediaConfig, fps: float | None = None) -> MediaItem:
    """Frames (uint8 [T, H, W, 3], or a list of images) → MediaItem with grid (T'/2, h/P, w/P) and timestamps.

    `fps` is the frame rate of the given frames. Known: they are sampled down to `cfg.video_fps`. None: the frames
    are taken as already sampled at `cfg.video_fps` (timestamps `i / video_fps`).
    """
    video = _frames_tensor(frames)  # [T, 3, H, W] uint8
    if fps is not None and fps <= 0:
        raise ValueError(f"video fps must be positive, got {fps}")
    indices = sample_frame_indices(video.shape[0], fps, cfg)
    video = video[indices]
    rate = fps if fps is not None else cfg.video_fps
    n, _, height, width = video.shape
    max_pixels = cfg.video_max_pixels
    if cfg.video_cap_pixels_per_frame:
        frame_cap = cfg.video_max_tokens_per_frame * cfg.factor**2
        per_frame = max(min(frame_cap, cfg.video_max_pixels // n), int(cfg.video_min_pixels * 1.05))
        max_pixels = per_frame * n
    h, w = smart_resize_video(n, height, width, cfg.factor, cfg.temporal_patch_size, cfg.video_min_pixels, max_pixels)
    if (height, width) != (h, w):
        video = F.interpolate(video, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
    tp = cfg.temporal_patch_size
    pad = -n % tp
    if pad:
        video = torch.cat([video, video[-1:].expand(pad, -1, -1, -1)])
        indices = indices + [indices[-1]] * pad
    stamps = [i / rate for i in indices]
    timestamps = tuple((stamps[i] + stamps[i + tp - 1]) / 2 for i in range(0, len(stamps), tp))
    grid = (video.shape[0] // tp, h // cfg.patch_size, w // cfg.patch_size)
    return MediaItem("video", _patchify(_normalize(video, cfg), cfg), grid, timestamps)


def _as_pil(image: PIL.Image.Image | np.ndarray) -> PIL.Image.Image:
    if isinstance(image, PIL.Image.Image):
        return image
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim in (2, 3):
        return PIL.Image.fromarray(image)
    raise ValueError(f"an image must be a PIL image or a uint8 [H, W(, C)] array, got {type(image).__name__}")


def _frames_tensor(frames: np.ndarray | torch.Tensor | list) -> torch.Tensor:
    if isinstance(frames, (list, tuple)):
        if not frames:
            raise ValueError("video has no frames")
        arrays = [np.asarray(to_rgb(_as_pil(f))) for f in frames]
        if len({a.shape for a in arrays}) != 1:
            raise ValueError(f"video frames differ in size: {sorted({a.shape[:2] for a in arrays})}")
        frames = np.stack(arrays)
    video = torch.as_tensor(frames)
    if video.dtype != torch.uint8 or video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"video frames must be uint8 [T, H, W, 3], got {video.dtype} {list(video.shape)}")
    return video.permute(0, 3, 1, 2).contiguous()


def fetch_bytes(source: str, cfg: MediaConfig, what: str = "image") -> bytes:
    """Raw bytes of a `data:` URL, an allowed local path / `file://` URL, or (opt-in) an http(s) URL."""
    if source.startswith("data:"):
        header, sep, payload = source.partition(",")
        if not sep or not header.endswith(";base64"):
            raise ValueError(f"{what} data URL must look like 'data:<mime>;base64,<data>'")
        if len(payload) * 3 // 4 > cfg.max_media_bytes:
            raise ValueError(f"{what} data is about {len(payload) * 3 // 4} bytes, over the limit of "
                             f"{cfg.max_media_bytes}")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ValueError(f"{what} data URL is not valid base64: {e}") from None
    scheme = urllib.parse.urlparse(source).scheme.lower()
    if scheme in ("http", "https"):
        if not cfg.allow_http:
            raise ValueError(f"fetching {what}s from http(s) URLs is disabled on this server; send a base64 data: "
                             "URL instead (or enable http media fetching)")
        try:
            with urllib.request.urlopen(source, timeout=cfg.http_timeout_s) as resp:  # noqa: S310 - scheme checked
                data = resp.read(cfg.max_media_bytes + 1)
        except OSError as e:
            raise ValueError(f"could not fetch {what} from {source}: {e}") from None
        if len(data) > cfg.max_media_bytes:
            raise ValueError(f"{what} at {source} is over the limit of {cfg.max_media_bytes} bytes")
        return data
    if scheme == "file":
        source = urllib.parse.unquote(urllib.parse.urlparse(source).path)
    elif scheme and len(scheme) > 1:
        raise ValueError(f"unsupported {what} URL scheme {scheme!r} (use data:, or an allowed local path)")
    return _read_local(Path(source), cfg, what)


def _read_local(path: Path, cfg: MediaConfig, what: str) -> bytes:
    if cfg.allowed_local_media_path is None:
        raise ValueError(f"local {what} files are not allowed (no allowed local media path is configured)")
    root = Path(cfg.allowed_local_media_path).resolve()
    resolved = path.resolve()
    if not resolved.is_relative_to(root):
        raise ValueError(f"{what} path {path} is outside the allowed local media path {root}")
    if not resolved.is_file():
        raise ValueError(f"{what} file {path} does not exist")
    if resolved.stat().st_size > cfg.max_media_bytes:
        raise ValueError(f"{what} file {path} is over the limit of {cfg.max_media_bytes} bytes")
    return resolved.read_bytes()


def decode_image(data: bytes, cfg: MediaConfig) -> PIL.Image.Image:
    """Decode PNG/JPEG/WebP (also GIF/BMP, first frame) bytes, refusing decompression bombs."""
    try:
        image = PIL.Image.open(io.BytesIO(data), formats=_IMAGE_FORMATS)
    except (PIL.UnidentifiedImageError, OSError) as e:
        raise ValueError(f"unreadable image ({len(data)} bytes): not a PNG, JPEG, WebP, GIF or BMP file") from e
    if image.width * image.height > cfg.max_source_pixels:
        raise ValueError(f"image is {image.width}x{image.height} pixels, over the limit of {cfg.max_source_pixels}")
    try:
        image.load()
    except (OSError, ValueError, PIL.Image.DecompressionBombError) as e:
        raise ValueError(f"unreadable image: {e}") from None
    return image


def load_image(source: str | bytes | PIL.Image.Image | np.ndarray, cfg: MediaConfig) -> PIL.Image.Image:
    """Any accepted image source → decoded PIL image."""
    if isinstance(source, (PIL.Image.Image, np.ndarray)):
        return _as_pil(source)
    if isinstance(source, bytes):
        if len(source) > cfg.max_media_bytes:
            raise ValueError(f"image is {len(source)} bytes, over the limit of {cfg.max_media_bytes}")
        return decode_image(source, cfg)
    if isinstance(source, str):
        return decode_image(fetch_bytes(source, cfg, "image"), cfg)
    raise ValueError(f"unsupported image input of type {type(source).__name__}")


def load_video(source: str | list | np.ndarray, cfg: MediaConfig, fps: float | None = None) -> VideoClip:
    """A list of frames (any image sources), a uint8 [T, H, W, 3] array, or a video file (needs PyAV)."""
    if isinstance(source, np.ndarray):
        return VideoClip(source, fps)
    if isinstance(source, (list, tuple)):
        if len(source) > cfg.video_max_frames * 64:
            raise ValueError(f"video has {len(source)} frames, over the limit of {cfg.video_max_frames * 64}")
        return VideoClip([load_image(frame, cfg) for frame in source], fps)
    if isinstance(source, str):
        return _decode_video_file(fetch_bytes(source, cfg, "video"))
    raise ValueError(f"unsupported video input of type {type(source).__name__}")


def _decode_video_file(data: bytes) -> VideoClip:
    try:
        import av  # optional dependency: only needed for video files
    except ImportError:
        raise ValueError("decoding video files needs PyAV, which is not installed; send the video as a list of "
                         "image frames instead") from None
    try:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            rate = float(stream.average_rate) if stream.average_rate else None
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    except (av.error.FFmpegError, ValueError, IndexError) as e:
        raise ValueError(f"unreadable video file: {e}") from None
    if not frames:
        raise ValueError("video file has no frames")
    return VideoClip(np.stack(frames), rate)


def image_item(source: str | bytes | PIL.Image.Image | np.ndarray, cfg: MediaConfig) -> MediaItem:
    """Load + preprocess one image from any accepted source."""
    return preprocess_image(load_image(source, cfg), cfg)


def video_item(source: str | list | np.ndarray, cfg: MediaConfig, fps: float | None = None) -> MediaItem:
    """Load + preprocess one video (frames list, frame array, or a file when PyAV is installed)."""
    clip = load_video(source, cfg, fps)
    return preprocess_video(clip.frames, cfg, clip.fps)

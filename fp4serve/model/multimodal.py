"""Prompts with images and videos: placeholder expansion, 3-D MRoPE positions, and what the engine needs.

The chat template renders each image as `<|vision_start|><|image_pad|><|vision_end|>` and each video as
`<|vision_start|><|video_pad|><|vision_end|>`. `build_multimodal_prompt` expands them to the vision tower's output
size, as vLLM's Qwen3-VL/3.5 processor does:
- image (grid 1×h×w patches): the single pad becomes h·w/4 pads;
- video (grid t'×h×w): the whole start/pad/end triple becomes, per temporal patch f,
  `<{ts_f:.1f} seconds>` (tokenized on its own) + `<|vision_start|>` + h·w/4 pads + `<|vision_end|>`.

Positions follow transformers' `get_rope_index`: text tokens advance one position on all three axes (T, H, W); a
vision segment (one image, or one temporal patch of a video) of merged size H×W, starting at counter `cur`, gives
token (r, c) the position (cur, cur + r, cur + c) and then advances `cur` by max(H, W). After the prompt, token n
sits at n + rope_delta on every axis, so decode needs only the one integer.

Everything is computed once when a request is admitted (the result is a `MultimodalPrompt`); the runner only slices.
Feature rows of all media are kept in prompt order, so the i-th placeholder token takes the i-th vision output row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fp4serve.model.media import MediaItem


@dataclass(frozen=True)
class VisionTokenIds:
    """Special token ids of the vision path (defaults: Qwen3.5's config.json)."""

    image: int = 248056
    video: int = 248057
    vision_start: int = 248053
    vision_end: int = 248054

    @classmethod
    def from_config(cls, config: dict) -> VisionTokenIds:
        """From a top-level config.json dict (`image_token_id`, `video_token_id`, `vision_{start,end}_token_id`)."""
        d = cls()
        return cls(
            image=int(config.get("image_token_id", d.image)),
            video=int(config.get("video_token_id", d.video)),
            vision_start=int(config.get("vision_start_token_id", d.vision_start)),
            vision_end=int(config.get("vision_end_token_id", d.vision_end)),
        )


@dataclass(frozen=True)
class MultimodalPrompt:
    """An expanded prompt with its media: everything the engine needs for prefill and decode positions."""

    token_ids: list[int]  # expanded prompt, L tokens
    positions: torch.Tensor  # [3, L] int64 (T, H, W)
    rope_delta: int  # token n >= L sits at n + rope_delta on all axes
    mm_token_positions: torch.Tensor  # [M] int64, ascending: prompt indices of the placeholder tokens
    pixel_values: torch.Tensor  # [rows, C·T·P·P] float32, media in prompt order
    grid_thw: torch.Tensor  # [num_media, 3] int64, in prompt order
    items: tuple[MediaItem, ...]  # in prompt order

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def positions_for(self, start: int, end: int) -> torch.Tensor:
        """[3, end − start] positions of tokens start..end−1 (prompt tokens, then generated ones)."""
        length = self.num_tokens
        parts = []
        if start < length:
            parts.append(self.positions[:, start:min(end, length)])
        if end > length:
            tail = torch.arange(max(start, length), end, dtype=torch.int64) + self.rope_delta
            parts.append(tail.expand(3, -1))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def feature_slice(self, start: int, end: int) -> tuple[torch.Tensor, slice]:
        """For prompt tokens start..end−1: the placeholder rows relative to `start`, and the feature rows they take."""
        lo = int(torch.searchsorted(self.mm_token_positions, start))
        hi = int(torch.searchsorted(self.mm_token_positions, end))
        return self.mm_token_positions[lo:hi] - start, slice(lo, hi)


def _segments(items: Sequence[MediaItem], merge_size: int) -> list[tuple[str, int, int]]:
    """One (kind, H, W) merged-grid segment per image and per temporal patch of each video, in order."""
    out = []
    for item in items:
        t, h, w = item.grid_thw
        out.extend([(item.kind, h // merge_size, w // merge_size)] * t)
    return out


def mrope_positions(
    token_ids: Sequence[int],
    items: Sequence[MediaItem],
    ids: VisionTokenIds = VisionTokenIds(),
    merge_size: int = 2,
) -> tuple[torch.Tensor, int]:
    """3-D positions [3, L] and rope_delta for an expanded prompt whose media are `items` in prompt order."""
    tokens = np.asarray(token_ids, dtype=np.int64)
    length = len(tokens)
    pos = np.empty((3, length), dtype=np.int64)
    pad_kind = {ids.image: "image", ids.video: "video"}
    is_pad = (tokens == ids.image) | (tokens == ids.video)
    pad_idx = np.flatnonzero(is_pad)
    segments = iter(_segments(items, merge_size))
    cur = i = 0
    while i < length:
        if not is_pad[i]:
            nxt = pad_idx[np.searchsorted(pad_idx, i)] if len(pad_idx) and pad_idx[-1] > i else length
            pos[:, i:nxt] = cur + np.arange(nxt - i)
            cur += nxt - i
            i = nxt
            continue
        kind = pad_kind[int(tokens[i])]
        seg = next(segments, None)
        if seg is None or seg[0] != kind:
            raise ValueError(f"prompt token {i} is a {kind} placeholder but the next media item is "
                             f"{'missing' if seg is None else 'a ' + seg[0]}")
        _, hh, ww = seg
        n = hh * ww
        if i + n > length or not (tokens[i:i + n] == tokens[i]).all():
            raise ValueError(f"{kind} placeholder run at token {i} is shorter than its {hh}x{ww} feature grid")
        pos[0, i:i + n] = cur
        pos[1, i:i + n] = cur + np.repeat(np.arange(hh), ww)
        pos[2, i:i + n] = cur + np.tile(np.arange(ww), hh)
        cur += max(hh, ww)
        i += n
    if next(segments, None) is not None:
        raise ValueError("more media items than placeholder runs in the prompt")
    delta = int(pos.max()) + 1 - length if length else 0
    return torch.from_numpy(pos), delta


def _timestamp_text(seconds: float) -> str:
    return f"<{seconds:.1f} seconds>"


def expand_placeholders(
    prompt_ids: Sequence[int],
    images: Sequence[MediaItem],
    videos: Sequence[MediaItem],
    ids: VisionTokenIds = VisionTokenIds(),
    encode_text: Callable[[str], list[int]] | None = None,
    merge_size: int = 2,
) -> tuple[list[int], list[MediaItem]]:
    """Expand each image/video placeholder of a rendered prompt; returns (token ids, media in prompt order)."""
    n_img = sum(1 for t in prompt_ids if t == ids.image)
    n_vid = sum(1 for t in prompt_ids if t == ids.video)
    if n_img != len(images) or n_vid != len(videos):
        raise ValueError(f"the prompt has {n_img} image and {n_vid} video placeholder(s) but {len(images)} image(s) "
                         f"and {len(videos)} video(s) were given")
    if videos and encode_text is None:
        raise ValueError("video input needs a tokenizer (encode_text) for its timestamp text")
    image_iter, video_iter = iter(images), iter(videos)
    out: list[int] = []
    ordered: list[MediaItem] = []
    i = 0
    while i < len(prompt_ids):
        tok = prompt_ids[i]
        if tok == ids.image:
            item = next(image_iter)
            out.extend([ids.image] * item.num_tokens(merge_size))
            ordered.append(item)
        elif tok == ids.video:
            item = next(video_iter)
            t, h, w = item.grid_thw
            if len(item.timestamps) != t:
                raise ValueError(f"video has {t} temporal patches but {len(item.timestamps)} timestamps")
            # the template's markers around the pad are replaced by per-frame markers (vLLM's behaviour)
            framed = bool(out) and out[-1] == ids.vision_start and i + 1 < len(prompt_ids) \
                and prompt_ids[i + 1] == ids.vision_end
            if framed:
                out.pop()
            for ts in item.timestamps:
                out.extend(encode_text(_timestamp_text(ts)))
                out.append(ids.vision_start)
                out.extend([ids.video] * (h * w // merge_size**2))
                out.append(ids.vision_end)
            ordered.append(item)
            if framed:
                i += 1
        else:
            out.append(tok)
        i += 1
    return out, ordered


def build_multimodal_prompt(
    prompt_ids: Sequence[int],
    images: Sequence[MediaItem] = (),
    videos: Sequence[MediaItem] = (),
    *,
    ids: VisionTokenIds = VisionTokenIds(),
    encode_text: Callable[[str], list[int]] | None = None,
    merge_size: int = 2,
) -> MultimodalPrompt:
    """Rendered prompt ids (one placeholder per image/video) + preprocessed media → `MultimodalPrompt`."""
    token_ids, ordered = expand_placeholders(prompt_ids, images, videos, ids, encode_text, merge_size)
    positions, delta = mrope_positions(token_ids, ordered, ids, merge_size)
    tokens = torch.tensor(token_ids, dtype=torch.int64)
    mm_rows = torch.nonzero((tokens == ids.image) | (tokens == ids.video)).flatten()
    if ordered:
        pixel_values = torch.cat([item.pixel_values for item in ordered])
    else:
        pixel_values = torch.empty(0, 0)
    grid_thw = torch.tensor([item.grid_thw for item in ordered], dtype=torch.int64).reshape(-1, 3)
    return MultimodalPrompt(token_ids, positions, delta, mm_rows, pixel_values, grid_thw, tuple(ordered))


def encode_media(visual: torch.nn.Module, prompt: MultimodalPrompt) -> torch.Tensor:
    """Run the vision tower once for all media of a prompt → feature rows [M, text_hidden] in placeholder order."""
    param = next(visual.parameters())
    if not prompt.items:
        return torch.empty(0, visual.config.out_hidden_size, device=param.device, dtype=param.dtype)
    feats = visual(prompt.pixel_values.to(device=param.device, dtype=param.dtype), prompt.grid_thw)
    assert feats.shape[0] == prompt.mm_token_positions.numel()
    return feats

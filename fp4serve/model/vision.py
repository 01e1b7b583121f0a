"""The Qwen3.5 vision tower (`model.visual.*`): pixel patches of images and videos → text-width feature rows.

Data flow for a batch of images/videos given as patch rows `[rows, C·T·P·P]` plus their grids `(t, h, w)` (in
patches): a linear patch embedding (the checkpoint's Conv3d with kernel = stride is exactly a matmul on one row),
a learned 2-D position table bilinearly resampled (align_corners) to each grid, a stack of pre-norm ViT blocks with
2-D rotary attention, and a merger that folds each 2×2 block of patches into one text-width token.

Two design choices:
- Attention is restricted to each image and to each temporal slice of a video (segments of h·w rows). We run it as
  one `scaled_dot_product_attention` call per grid with the temporal slices as the batch dimension, so a grid
  never sees another grid's tokens and no mask is materialised. Rows are merge-block ordered (each 2×2 block's four
  patches are adjacent), so the rotary coordinates and the resampled position table are permuted the same way.
- The tower is always plain (B)F16 `nn.Linear`s: the vision encoder is never quantized, and a checkpoint that
  carries NVFP4 vision tensors is rejected at load time instead of being silently misread.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fp4serve.checkpoint.safetensors_io import CheckpointReader

_ACTIVATIONS = {
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "silu": F.silu,
}
_QUANT_SUFFIXES = ("weight_scale", "weight_scale_2", "input_scale", "weight_packed")


@dataclass(frozen=True)
class VisionConfig:
    """The fields of config.json's `vision_config` that the tower uses (defaults: Qwen3.5-27B)."""

    depth: int = 27
    hidden_size: int = 1152
    num_heads: int = 16
    intermediate_size: int = 4304
    hidden_act: str = "gelu_pytorch_tanh"
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    out_hidden_size: int = 5120
    num_position_embeddings: int = 2304
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @property
    def grid_side(self) -> int:
        return math.isqrt(self.num_position_embeddings)

    @classmethod
    def from_dict(cls, d: dict) -> VisionConfig:
        """Parse a `vision_config` dict (as stored in a Qwen3.5 config.json)."""
        if d.get("deepstack_visual_indexes"):
            raise ValueError(
                f"vision_config.deepstack_visual_indexes={d['deepstack_visual_indexes']} is not supported "
                "(Qwen3.5 has no deepstack taps; this looks like a Qwen3-VL checkpoint)"
            )
        if d.get("hidden_act", cls.hidden_act) not in _ACTIVATIONS:
            raise ValueError(f"vision_config.hidden_act={d['hidden_act']!r} is not one of {sorted(_ACTIVATIONS)}")
        rope = d.get("rope_parameters") or {}
        fields = {
            name: d[name]
            for name in (
                "depth", "hidden_size", "num_heads", "intermediate_size", "hidden_act", "in_channels", "patch_size",
                "temporal_patch_size", "spatial_merge_size", "out_hidden_size", "num_position_embeddings",
            )
            if name in d
        }
        for name in ("patch_size", "temporal_patch_size"):
            if isinstance(fields.get(name), (list, tuple)):
                values = set(fields[name])
                if len(values) != 1:
                    raise ValueError(f"vision_config.{name}={fields[name]} must be a single size")
                fields[name] = values.pop()
        cfg = cls(**fields, rope_theta=float(rope.get("rope_theta", cls.rope_theta)))
        if cfg.hidden_size % cfg.num_heads or cfg.head_dim % 4:
            raise ValueError(f"vision_config: hidden_size {cfg.hidden_size} / num_heads {cfg.num_heads} must give a "
                             "head_dim divisible by 4 (2-D rotary)")
        if cfg.grid_side**2 != cfg.num_position_embeddings:
            raise ValueError(f"vision_config.num_position_embeddings={cfg.num_position_embeddings} is not a square")
        return cfg

    @classmethod
    def from_model_config(cls, config: dict) -> VisionConfig:
        """Parse the `vision_config` section of a top-level (`qwen3_5`) config.json dict."""
        if "vision_config" not in config:
            raise ValueError("config.json has no vision_config: this is a text-only checkpoint")
        return cls.from_dict(config["vision_config"])


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, grids: list[tuple[int, int, int]]):
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, -1).unbind(1)  # [N, H, D] each
        q, k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)
        out = torch.empty_like(q)
        start = 0
        for t, h, w in grids:
            end = start + t * h * w
            # temporal slices become the batch: attention never crosses a slice or a grid
            qs, ks, vs = (z[start:end].view(t, h * w, self.num_heads, -1).transpose(1, 2) for z in (q, k, v))
            o = F.scaled_dot_product_attention(qs, ks, vs)  # [t, H, hw, D]
            out[start:end] = o.transpose(1, 2).reshape(end - start, self.num_heads, -1)
            start = end
        return self.proj(out.view(n, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.linear_fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.linear_fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = _ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)

    def forward(self, x, cos, sin, grids):
        x = x + self.attn(self.norm1(x), cos, sin, grids)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Holds the checkpoint's Conv3d weight `[hidden, C, T, P, P]`; applied as a matmul on flattened patch rows."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=kernel, stride=kernel, bias=True)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight.reshape(self.proj.weight.shape[0], -1)  # [hidden, C·T·P·P]
        return F.linear(rows.to(weight.dtype), weight, self.proj.bias)


class PatchMerger(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        merged = cfg.hidden_size * cfg.spatial_merge_size**2
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.linear_fc1 = nn.Linear(merged, merged)
        self.linear_fc2 = nn.Linear(merged, cfg.out_hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x).view(-1, self.linear_fc1.in_features)  # [N/4, 4·hidden]
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class Qwen35VisionModel(nn.Module):
    """`model.visual`: `forward(pixel_values [rows, C·T·P·P], grid_thw [n, 3]) -> [rows / merge², out_hidden]`."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.pos_embed.weight.dtype

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor | list[tuple[int, int, int]]) -> torch.Tensor:
        grids = [tuple(int(v) for v in g) for g in (grid_thw.tolist() if torch.is_tensor(grid_thw) else grid_thw)]
        self._check_grids(pixel_values, grids)
        x = self.patch_embed(pixel_values)  # [N, hidden]
        x = x + self._position_embeddings(grids).to(x.dtype)
        cos, sin = self._rotary(grids, x.device)
        for block in self.blocks:
            x = block(x, cos, sin, grids)
        return self.merger(x)

    def _check_grids(self, pixel_values: torch.Tensor, grids: list[tuple[int, ...]]) -> None:
        cfg = self.config
        m = cfg.spatial_merge_size
        if pixel_values.ndim != 2 or pixel_values.shape[1] != cfg.patch_dim:
            raise ValueError(f"pixel_values must be [rows, {cfg.patch_dim}], got {list(pixel_values.shape)}")
        for g in grids:
            if len(g) != 3 or min(g) < 1 or g[1] % m or g[2] % m:
                raise ValueError(f"grid_thw entry {list(g)} must be (t, h, w) with h and w multiples of {m}")
        rows = sum(t * h * w for t, h, w in grids)
        if rows != pixel_values.shape[0]:
            raise ValueError(f"grid_thw covers {rows} patch rows but pixel_values has {pixel_values.shape[0]}")

    def _block_order(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Raster `[h, w, ...]` → merge-block order `[h·w, ...]` (blocks row-major, then patches inside a block)."""
        m = self.config.spatial_merge_size
        x = x.reshape(h // m, m, w // m, m, *x.shape[2:]).transpose(1, 2)
        return x.reshape(h * w, *x.shape[4:])

    def _position_embeddings(self, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        side = self.config.grid_side
        table = self.pos_embed.weight.float().t().reshape(1, -1, side, side)  # [1, hidden, S, S]
        parts = []
        for t, h, w in grids:
            grid = F.interpolate(table, size=(h, w), mode="bilinear", align_corners=True)[0]  # [hidden, h, w]
            parts.append(self._block_order(grid.permute(1, 2, 0), h, w).repeat(t, 1))
        return torch.cat(parts)  # [N, hidden] float32

    def _rotary(self, grids: list[tuple[int, int, int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        quarter = cfg.head_dim // 4
        inv_freq = cfg.rope_theta ** (-torch.arange(quarter, dtype=torch.float32, device=device) / quarter)
        coords = []
        for t, h, w in grids:
            rc = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), dim=-1)  # [h, w, 2]
            coords.append(self._block_order(rc, h, w).repeat(t, 1))
        rc = torch.cat(coords).to(device=device, dtype=torch.float32)  # [N, 2] (row, col)
        angles = (rc[:, :, None] * inv_freq).flatten(1)  # [N, D/2]: rows' freqs then cols' freqs
        angles = torch.cat([angles, angles], dim=-1)  # [N, D]
        return angles.cos(), angles.sin()


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE over the whole head in fp32; x [N, H, D], cos/sin [N, D]."""
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos[:, None] + rotated * sin[:, None]).to(x.dtype)


def read_vision_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All `model.visual.*` tensors of a checkpoint directory, keyed without the prefix (also accepts `visual.*`)."""
    tensors: dict[str, torch.Tensor] = {}
    with CheckpointReader(path) as reader:
        for name in reader.names():
            for prefix in ("model.visual.", "visual."):
                if name.startswith(prefix):
                    tensors[name[len(prefix):]] = reader.get(name)
    quantized = sorted(n for n, t in tensors.items() if n.endswith(_QUANT_SUFFIXES) or t.dtype == torch.uint8)
    if quantized:
        raise ValueError(
            f"checkpoint {path}: the vision tower has quantized tensors ({', '.join(quantized[:3])}, ...); "
            "the vision encoder must stay BF16 — re-export with model.visual excluded from quantization"
        )
    return tensors


def has_vision_tower(path: str | Path) -> bool:
    """Whether a checkpoint directory has a vision tower: a `vision_config` and `model.visual.*` tensors."""
    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(config.get("vision_config"), dict):
        return False
    with CheckpointReader(path) as reader:
        return any(name.startswith(("model.visual.", "visual.")) for name in reader.names())


def load_vision_model(
    path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16
) -> Qwen35VisionModel:
    """Build the vision tower from a BF16 or NVFP4 checkpoint directory (vision tensors are always unquantized)."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"checkpoint {path}: no config.json")
    cfg = VisionConfig.from_model_config(json.loads(config_file.read_text()))
    tensors = read_vision_tensors(path)
    if not tensors:
        raise ValueError(f"checkpoint {path}: has a vision_config but no model.visual.* tensors")
    with torch.device("meta"):
        model = Qwen35VisionModel(cfg)
    expected = dict(model.state_dict())
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"checkpoint {path}: vision tensors do not match vision_config "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    for name, ref in expected.items():
        if tuple(tensors[name].shape) != tuple(ref.shape):
            raise ValueError(f"checkpoint {path}: model.visual.{name} has shape {list(tensors[name].shape)}, "
                             f"expected {list(ref.shape)}")
    state = {name: t.to(device=device, dtype=dtype) for name, t in tensors.items()}
    model.load_state_dict(state, assign=True)
    return model.eval()

"""Run calibration windows through one Qwen3.5 decoder layer at a time, recording what the quantizer needs.

Quantizing a model far larger than memory never builds the whole model: each decoder layer is built alone from the
source checkpoint's tensors, the calibration hidden states of every window ([W, L, hidden], kept in memory for the
whole run) go through it in batches of windows, and forward pre-hooks on its Linears record per input group the
activation amax (for `input_scale`) and, when the algorithm wants it, H = sum of x x^T (the GPTQ Hessian). The
layer's outputs replace its inputs in place, becoming the next layer's inputs.

A batch of windows is an ordinary prefill `ForwardBatch` (every window a fresh sequence at positions 0..L-1), run
by the layer's own forward over a cache that holds only this layer's entries, so calibration uses exactly the
model code that serves.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from fp4serve.checkpoint.safetensors_io import CheckpointReader
from fp4serve.engine.batch import ForwardBatch, ModelCache
from fp4serve.model.config import Qwen35TextConfig
from fp4serve.model.qwen3_5 import DecoderLayer, plain_linear_factory
from fp4serve.ops.rope import mrope_cos_sin

CACHE_BLOCK_SIZE = 16


@dataclass
class InputStats:
    """Statistics of the input one group of Linears reads."""

    amax: torch.Tensor  # float32 0-d: max |x| over all calibration tokens
    hessian: torch.Tensor | None = None  # float32 [K, K]: sum of x x^T
    tokens: int = 0


@dataclass
class StatsRecorder:
    """Forward pre-hooks on the first Linear of each input group (the others read the same tensor)."""

    want_hessian: bool
    stats: dict[str, InputStats] = field(default_factory=dict)
    _handles: list = field(default_factory=list)

    def attach(self, module: nn.Module, key: str) -> None:
        def hook(_: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            amax = x.abs().amax().float()
            entry = self.stats.get(key)
            if entry is None:
                entry = self.stats[key] = InputStats(amax=amax)
            else:
                entry.amax = torch.maximum(entry.amax, amax)
            if self.want_hessian:
                xf = x.float()
                update = xf.T @ xf  # [K, K]
                entry.hessian = update if entry.hessian is None else entry.hessian.add_(update)
            entry.tokens += x.shape[0]

        self._handles.append(module.register_forward_pre_hook(hook))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def build_layer(config: Qwen35TextConfig, index: int, dtype: torch.dtype, device: torch.device | str) -> DecoderLayer:
    """An empty decoder layer `index` with plain Linears, allocated on `device`."""
    with torch.device("meta"):
        layer = DecoderLayer(config, index, plain_linear_factory(dtype), dtype, None)
    return layer.to_empty(device=device)


def layer_tensor_names(config: Qwen35TextConfig, index: int) -> dict[str, tuple[int, ...]]:
    """Parameter name (relative to the layer) -> shape, for decoder layer `index`."""
    with torch.device("meta"):
        layer = DecoderLayer(config, index, plain_linear_factory(torch.bfloat16), torch.bfloat16, None)
    return {name: tuple(p.shape) for name, p in layer.state_dict().items()}


@torch.no_grad()
def load_layer(layer: DecoderLayer, reader: CheckpointReader, prefix: str) -> dict[str, torch.Tensor]:
    """Fill `layer` from `<prefix><name>` tensors; return the source tensors as read (original dtypes)."""
    source: dict[str, torch.Tensor] = {}
    for name, param in layer.state_dict().items():
        tensor = reader.get(prefix + name)
        source[name] = tensor
        param.copy_(tensor.to(param.dtype))
    return source


def prefill_batch(
    num_seqs: int, seq_len: int, device: torch.device | str, input_ids: torch.Tensor | None = None
) -> ForwardBatch:
    """`num_seqs` fresh sequences of `seq_len` tokens each; input_ids [num_seqs * seq_len] (zeros when None: a
    layer-by-layer run feeds hidden states, not ids)."""
    blocks_per_seq = math.ceil(seq_len / CACHE_BLOCK_SIZE)
    pos = torch.arange(seq_len, device=device)
    seq = torch.arange(num_seqs, device=device)
    slot = (seq[:, None] * blocks_per_seq * CACHE_BLOCK_SIZE + pos[None, :]).reshape(-1)
    tables = torch.arange(num_seqs * blocks_per_seq, dtype=torch.int32, device=device).view(num_seqs, blocks_per_seq)
    lens = (seq_len,) * num_seqs
    return ForwardBatch(
        input_ids=(
            torch.zeros(num_seqs * seq_len, dtype=torch.int64, device=device)
            if input_ids is None
            else input_ids.reshape(-1).to(device=device, dtype=torch.int64)
        ),
        positions=pos.repeat(num_seqs).expand(3, -1).contiguous(),
        cu_seqlens=(torch.arange(num_seqs + 1, device=device) * seq_len).to(torch.int32),
        context_lens=torch.zeros(num_seqs, dtype=torch.int32, device=device),
        seq_lens=torch.full((num_seqs,), seq_len, dtype=torch.int32, device=device),
        slot_mapping=slot.to(torch.int64),
        block_tables=tables,
        state_indices=seq.to(torch.int64),
        has_initial_state=torch.zeros(num_seqs, dtype=torch.bool, device=device),
        logits_indices=torch.zeros(0, dtype=torch.int64, device=device),
        query_lens=lens,
        context_lens_host=(0,) * num_seqs,
        max_query_len=seq_len,
        max_seq_len=seq_len,
    )


def layer_cache(
    config: Qwen35TextConfig, index: int, num_seqs: int, seq_len: int, device: torch.device | str, dtype: torch.dtype
) -> ModelCache:
    """A cache with entries only for layer `index`, big enough for `num_seqs` sequences of `seq_len` tokens."""
    c = config
    layers = c.num_hidden_layers
    kv: list[torch.Tensor | None] = [None] * layers
    conv: list[torch.Tensor | None] = [None] * layers
    ssm: list[torch.Tensor | None] = [None] * layers
    if c.is_full_attention(index):
        blocks = num_seqs * math.ceil(seq_len / CACHE_BLOCK_SIZE)
        shape = (2, blocks, CACHE_BLOCK_SIZE, c.num_key_value_heads, c.head_dim)
        kv[index] = torch.zeros(shape, dtype=dtype, device=device)
    else:
        conv[index] = torch.zeros(num_seqs, c.conv_dim, c.linear_conv_kernel_dim - 1, dtype=dtype, device=device)
        ssm_shape = (num_seqs, c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim)
        ssm[index] = torch.zeros(ssm_shape, dtype=torch.float32, device=device)
    return ModelCache(kv=kv, conv=conv, ssm=ssm, block_size=CACHE_BLOCK_SIZE)


@dataclass(frozen=True)
class LayerRunner:
    """Runs one decoder layer over all calibration windows, `windows_per_batch` windows at a time."""

    config: Qwen35TextConfig
    windows_per_batch: int

    @torch.no_grad()
    def run(
        self,
        layer: DecoderLayer,
        index: int,
        hidden: torch.Tensor,
        *,
        write_back: bool,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        """Forward every window of hidden [W, L, H] through `layer`; replace `hidden` by the outputs if asked."""
        num_windows, seq_len, width = hidden.shape
        device, dtype = hidden.device, hidden.dtype
        per_batch = min(self.windows_per_batch, num_windows)
        cache = layer_cache(self.config, index, per_batch, seq_len, device, dtype)
        c = self.config
        batches: dict[int, tuple[ForwardBatch, torch.Tensor, torch.Tensor]] = {}
        for start in range(0, num_windows, per_batch):
            count = min(per_batch, num_windows - start)
            if count not in batches:
                batch = prefill_batch(count, seq_len, device)
                cos, sin = mrope_cos_sin(batch.positions, c.rotary_dim, c.rope_theta, c.mrope_section)
                batches[count] = (batch, cos, sin)
            batch, cos, sin = batches[count]
            x = hidden[start : start + count].reshape(count * seq_len, width)
            out = layer(x, batch, cache, cos, sin)
            if write_back:
                hidden[start : start + count] = out.view(count, seq_len, width).to(dtype)
            if on_batch is not None:
                on_batch(count)

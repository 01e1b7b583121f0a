"""`NVFP4Embedding`: a token embedding stored in ModelOpt's NVFP4 layout (vLLM's `nvfp4_embed`), also the tied lm_head.

The table [vocab, hidden] is quantized like a Linear weight with blocks along the hidden dimension, so every row
(token) is self-contained: a lookup gathers the packed bytes and block scales of the requested rows and dequantizes
only those. With tied embeddings the same table is the lm_head, `logits(hidden)` = hidden @ W^T, computed through
`nvfp4_linear` (activations are never quantized: the lm_head stays out of W4A4, as in vLLM).

As in `NVFP4Linear`, a dense dequantized copy is cached while the module lives on the CPU (where small demo models
run and unpacking on every call dominates), and never on a GPU; the cache is rebuilt whenever a buffer changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fp4serve.ops.nvfp4 import nvfp4_linear
from fp4serve.quant.nvfp4 import BLOCK_SIZE, dequantize_weight


class NVFP4Embedding(nn.Module):
    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if embedding_dim <= 0 or embedding_dim % BLOCK_SIZE:
            raise ValueError(f"NVFP4Embedding: embedding_dim {embedding_dim} must be a multiple of {BLOCK_SIZE}")
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.dtype = dtype
        v, h = num_embeddings, embedding_dim
        self.register_buffer("weight", torch.zeros(v, h // 2, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.ones(v, h // BLOCK_SIZE, device=device).to(torch.float8_e4m3fn))
        self.register_buffer("weight_scale_2", torch.zeros((), dtype=torch.float32, device=device))
        self._cache: torch.Tensor | None = None
        self._cache_key: tuple | None = None

    @property
    def out_features(self) -> int:
        """Rows of the table seen as the tied lm_head's weight [out_features, in_features]."""
        return self.num_embeddings

    @property
    def in_features(self) -> int:
        return self.embedding_dim

    def _dense(self, dtype: torch.dtype) -> torch.Tensor | None:
        if self.weight.device.type != "cpu":
            self._cache = self._cache_key = None
            return None
        tensors = (self.weight, self.weight_scale, self.weight_scale_2)
        key = (dtype, *((id(t), t.data_ptr(), t._version) for t in tensors))
        if self._cache_key != key:
            self._cache = dequantize_weight(*tensors, dtype=dtype)
            self._cache_key = key
        return self._cache

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [...] -> embeddings [..., hidden] in the module dtype."""
        dense = self._dense(self.dtype)
        if dense is not None:
            return F.embedding(ids, dense)
        flat = ids.reshape(-1)
        rows = dequantize_weight(self.weight[flat], self.weight_scale[flat], self.weight_scale_2, dtype=self.dtype)
        return rows.view(*ids.shape, self.embedding_dim)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tied lm_head: hidden [R, hidden] -> [R, vocab] in hidden's dtype."""
        dense = self._dense(hidden.dtype)
        if dense is not None:
            return F.linear(hidden, dense)
        return nvfp4_linear(hidden, self.weight, self.weight_scale, self.weight_scale_2)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, nvfp4"

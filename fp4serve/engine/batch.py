"""The per-step batch the runner hands to the model, and the cache tensors the model reads and writes.

One typed object carries every per-step tensor (vLLM's "attention metadata", nano-vllm's `Context`), passed as an
argument, never as a module global. A step is a flat, variable-length batch of tokens: sequence `i` contributes
`query_lens[i]` new tokens after `context_lens[i]` tokens that are already in its caches, so prefill, chunked
prefill and decode are the same thing with different lengths, and one step may mix them.

Cache layout (allocated by the runner, indexed by the model's own layer numbering):
- full-attention layer `l`: `kv[l]` of shape [2, num_blocks, block_size, num_kv_heads, head_dim] (K then V),
  addressed by `slot_mapping` (write) and `block_tables` (read); paged, like vLLM.
- Gated DeltaNet layer `l`: `conv[l]` of shape [num_slots, conv_dim, kernel_size - 1] (model dtype, the last
  `kernel_size - 1` pre-conv inputs, oldest first) and `ssm[l]` of shape [num_slots, num_v_heads, k_dim, v_dim]
  (float32), one fixed slot per running sequence, addressed by `state_indices`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class ForwardBatch:
    """Everything the model needs for one step, on the model's device unless noted."""

    input_ids: torch.Tensor  # [N] int64
    positions: torch.Tensor  # [3, N] int64 — MRoPE (T, H, W); all three rows equal for text
    cu_seqlens: torch.Tensor  # [B+1] int32 — prefix sums of query_lens
    context_lens: torch.Tensor  # [B] int32 — tokens already cached before this step
    seq_lens: torch.Tensor  # [B] int32 — context_lens + query_lens
    slot_mapping: torch.Tensor  # [N] int64 — KV-cache slot (block * block_size + offset) of each new token
    block_tables: torch.Tensor  # [B, max_blocks] int32 — KV blocks of each sequence, in order
    state_indices: torch.Tensor  # [B] int64 — DeltaNet state slot of each sequence
    has_initial_state: torch.Tensor  # [B] bool — False: start from zero state (context_lens == 0)
    logits_indices: torch.Tensor  # [R] int64 — rows of the N tokens whose logits are wanted
    # host-side copies, so the model can branch and loop without device syncs
    query_lens: tuple[int, ...]
    context_lens_host: tuple[int, ...]
    max_query_len: int
    max_seq_len: int
    # multimodal: feature rows that replace the embeddings of rows `mm_token_rows` of the N tokens
    mm_embeds: torch.Tensor | None = None  # [M, hidden]
    mm_token_rows: torch.Tensor | None = None  # [M] int64

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


@dataclass(frozen=True, slots=True)
class ModelCache:
    """Cache tensors, one entry per decoder layer (None where the layer has no such cache)."""

    kv: list[torch.Tensor | None]  # full-attention layers: [2, num_blocks, block_size, Hkv, D]
    conv: list[torch.Tensor | None]  # DeltaNet layers: [num_slots, conv_dim, kernel_size - 1]
    ssm: list[torch.Tensor | None]  # DeltaNet layers: [num_slots, HV, K, V] float32
    block_size: int

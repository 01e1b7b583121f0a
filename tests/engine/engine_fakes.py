"""A tiny fake model with the real model's interface, whose next token is a function of the whole history.

It keeps the same two cache kinds as Qwen3.5: a "DeltaNet" layer whose state slot holds a running hash of the
sequence (plus its last three tokens as the conv state), and an "attention" layer whose paged KV cache holds each
token id (K) and its position (V). Every step it recomputes the hash from the KV cache through the block table and
checks it against the state slot, and checks the stored positions, so a wrong slot mapping, block table, state
index, `has_initial_state` flag or position shows up as an AssertionError instead of as a subtly different token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from fp4serve.engine.batch import ForwardBatch, ModelCache
from fp4serve.sampling import SamplingParams

HASH_MOD = 1_000_003  # < 2**24, so the running hash is exact in float32


def next_hash(h: int, token: int) -> int:
    return (h * 31 + token + 1) % HASH_MOD


def history_hash(history: list[int]) -> int:
    h = 0
    for t in history:
        h = next_hash(h, t)
    return h


def next_token(history: list[int], vocab_size: int) -> int:
    """The fake model's greedy next token after `history`."""
    return history_hash(history) % vocab_size


@dataclass(frozen=True)
class FakeConfig:
    vocab_size: int = 64
    max_position_embeddings: int = 256
    eos_token_id: int = 0


class FakeModel:
    def __init__(self, config: FakeConfig | None = None) -> None:
        self.config = config or FakeConfig()
        self.num_forward_tokens = 0
        # a pause per forward, to let tests act while requests are still running
        self.step_delay_s = 0.0

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        return 2 * 4

    def state_bytes_per_slot(self, dtype: torch.dtype) -> int:
        return 4 * 4

    def allocate_cache(
        self, num_blocks: int, block_size: int, num_slots: int, device: torch.device | str, dtype: torch.dtype
    ) -> ModelCache:
        kv = torch.full((2, num_blocks, block_size, 1, 1), -1.0, device=device)
        conv = torch.full((num_slots, 1, 3), -1.0, device=device)
        ssm = torch.full((num_slots, 1, 1, 1), -1.0, device=device)
        return ModelCache(kv=[None, kv], conv=[conv, None], ssm=[ssm, None], block_size=block_size)

    def forward(self, batch: ForwardBatch, cache: ModelCache) -> torch.Tensor:
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        kv, conv, ssm = cache.kv[1].view(2, -1), cache.conv[0], cache.ssm[0]
        bs = cache.block_size
        ids = batch.input_ids.tolist()
        positions = batch.positions.tolist()
        cu = batch.cu_seqlens.tolist()
        self.num_forward_tokens += len(ids)
        assert positions[0] == positions[1] == positions[2]
        kv[0, batch.slot_mapping] = batch.input_ids.float()
        kv[1, batch.slot_mapping] = batch.positions[0].float()
        hidden = [0] * len(ids)
        for i in range(batch.num_seqs):
            ctx, seq_len = batch.context_lens_host[i], int(batch.seq_lens[i])
            slot = int(batch.state_indices[i])
            assert bool(batch.has_initial_state[i]) == (ctx > 0)
            assert positions[0][cu[i] : cu[i + 1]] == list(range(ctx, seq_len)), "positions must be token indices"
            h = int(ssm[slot].item()) if ctx > 0 else 0
            assert h >= 0, "state slot read before it was written"
            for row in range(cu[i], cu[i + 1]):
                h = next_hash(h, ids[row])
                hidden[row] = h
            ssm[slot] = h
            table = batch.block_tables[i].tolist()
            gathered = [table[p // bs] * bs + p % bs for p in range(seq_len)]
            history, stored_pos = kv[:, gathered].long().tolist()
            assert stored_pos == list(range(seq_len)), "KV positions mismatch"
            assert history_hash(history) == h, "KV history and DeltaNet state disagree"
            conv[slot, 0] = torch.tensor(([-1.0] * 3 + [float(t) for t in history])[-3:])
        return torch.tensor(hidden, dtype=torch.float32)[:, None]  # [N, 1]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        target = hidden[:, 0].long() % self.config.vocab_size
        logits = torch.zeros(hidden.shape[0], self.config.vocab_size)
        logits[torch.arange(hidden.shape[0]), target] = 20.0
        return logits


def greedy(**kwargs: Any) -> SamplingParams:
    """Greedy sampling params with a small default max_tokens."""
    kwargs.setdefault("temperature", 0.0)
    kwargs.setdefault("max_tokens", 16)
    return SamplingParams(**kwargs)

"""Helpers for the Qwen3.5 model tests: tiny transformers reference models, and a minimal pager that turns
"sequence i gets these new tokens after ctx cached ones" into `ForwardBatch`es over our caches."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from fp4serve.engine.batch import ForwardBatch, ModelCache
from fp4serve.model.loader import load_model
from fp4serve.model.qwen3_5 import Qwen35ForCausalLM

VOCAB = 160


def text_config_kwargs(**overrides: object) -> dict:
    """A tiny text config with awkward sizes: head dims 24/20/28, rotary dim 6, GQA 2 and 3, attention at 1 and 3."""
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        linear_num_key_heads=2,
        linear_num_value_heads=6,
        linear_key_head_dim=20,
        linear_value_head_dim=28,
        linear_conv_kernel_dim=4,
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.25,
            "mrope_section": [1, 1, 1],
            "mrope_interleaved": True,
        },
        initializer_range=0.1,
        tie_word_embeddings=False,
        eos_token_id=None,
        pad_token_id=None,
    )
    kwargs.update(overrides)
    return kwargs


def randomize_small_params(model: torch.nn.Module, seed: int) -> None:
    """HF initialises norms to 0/1 and the gates to fixed values; give them random values so they are tested."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "A_log" in name or "dt_bias" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)


def build_hf_model(layout: str, seed: int = 0, **overrides: object) -> torch.nn.Module:
    from transformers import Qwen3_5Config, Qwen3_5ForCausalLM, Qwen3_5ForConditionalGeneration, Qwen3_5TextConfig

    torch.manual_seed(seed)
    text = text_config_kwargs(**overrides)
    if layout == "causal":
        model = Qwen3_5ForCausalLM(Qwen3_5TextConfig(**text))
    else:
        vision = dict(
            depth=1,
            hidden_size=32,
            intermediate_size=48,
            num_heads=2,
            out_hidden_size=text["hidden_size"],
            num_position_embeddings=16,
            patch_size=4,
            temporal_patch_size=2,
        )
        config = Qwen3_5Config(text_config=text, vision_config=vision, tie_word_embeddings=text["tie_word_embeddings"])
        model = Qwen3_5ForConditionalGeneration(config)
    model = model.float().eval()
    randomize_small_params(model, seed)
    return model


def save_and_load(hf_model: torch.nn.Module, directory: Path, dtype: torch.dtype = torch.float32) -> Qwen35ForCausalLM:
    hf_model.save_pretrained(directory)
    return load_model(directory, dtype=dtype, progress=False)


def hf_logits(hf_model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].float()


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).norm() / ref.double().norm()).item()


class Pager:
    """Fixed KV blocks and one DeltaNet state slot per sequence, in scrambled order so nothing lines up by luck."""

    def __init__(self, model: Qwen35ForCausalLM, num_seqs: int, max_len: int, block_size: int = 16) -> None:
        self.block_size = block_size
        self.blocks_per_seq = math.ceil(max_len / block_size)
        num_blocks = num_seqs * self.blocks_per_seq
        perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(1))
        self.tables = perm.view(num_seqs, self.blocks_per_seq).to(torch.int32)
        self.slots = torch.randperm(num_seqs + 2, generator=torch.Generator().manual_seed(2))[:num_seqs]
        self.cache: ModelCache = model.allocate_cache(num_blocks, block_size, num_seqs + 2, "cpu", model.dtype)
        # garbage in the state slots: sequences without history must not read it
        for states in (self.cache.conv, self.cache.ssm):
            for t in states:
                if t is not None:
                    t.normal_()

    def batch(self, steps: list[tuple[int, list[int], int]], all_logits: bool = False) -> ForwardBatch:
        """steps: (sequence index, new token ids, number of tokens already cached) per sequence in the batch."""
        ids, positions, slot_mapping, logits_rows = [], [], [], []
        for seq, tokens, ctx in steps:
            pos = torch.arange(ctx, ctx + len(tokens))
            ids.extend(tokens)
            positions.append(pos)
            slot_mapping.append(
                self.tables[seq, pos // self.block_size].long() * self.block_size + pos % self.block_size
            )
            start = len(ids) - len(tokens)
            logits_rows.extend(range(start, len(ids)) if all_logits else [len(ids) - 1])
        query_lens = tuple(len(t) for _, t, _ in steps)
        context = tuple(c for _, _, c in steps)
        pos = torch.cat(positions)
        return ForwardBatch(
            input_ids=torch.tensor(ids, dtype=torch.int64),
            positions=pos.expand(3, -1).clone(),
            cu_seqlens=torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32),
            context_lens=torch.tensor(context, dtype=torch.int32),
            seq_lens=torch.tensor([c + q for c, q in zip(context, query_lens, strict=True)], dtype=torch.int32),
            slot_mapping=torch.cat(slot_mapping),
            block_tables=self.tables[[s for s, _, _ in steps]],
            state_indices=self.slots[[s for s, _, _ in steps]],
            has_initial_state=torch.tensor([c > 0 for c in context]),
            logits_indices=torch.tensor(logits_rows, dtype=torch.int64),
            query_lens=query_lens,
            context_lens_host=context,
            max_query_len=max(query_lens),
            max_seq_len=max(c + q for c, q in zip(context, query_lens, strict=True)),
        )

    def logits(self, model: Qwen35ForCausalLM, batch: ForwardBatch) -> torch.Tensor:
        with torch.no_grad():
            hidden = model(batch, self.cache)
            return model.compute_logits(hidden[batch.logits_indices])

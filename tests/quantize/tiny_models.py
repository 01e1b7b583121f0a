"""Tiny random Qwen3.5 checkpoints (transformers, saved to disk) with a 256-byte tokenizer, for quantize/eval tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

VOCAB = 288


def write_byte_tokenizer(path: Path) -> None:
    """A byte-level BPE without merges: ids 0..255 are bytes, 256/257 are special tokens."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = HFTokenizer(models.BPE({ch: i for i, ch in enumerate(alphabet)}, []))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken("<|endoftext|>", special=True), AddedToken("<|im_end|>", special=True)])
    path.mkdir(parents=True, exist_ok=True)
    backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))


def text_kwargs(**overrides: object) -> dict:
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_conv_kernel_dim=4,
        layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=257,
        pad_token_id=256,
    )
    kwargs.update(overrides)
    return kwargs


def save_tiny_model(path: Path, layout: str = "causal", seed: int = 0, **overrides: object) -> Path:
    """Save a random BF16 Qwen3.5 (`causal` or `conditional`, the latter with a vision tower) plus tokenizer."""
    from transformers import Qwen3_5Config, Qwen3_5ForCausalLM, Qwen3_5ForConditionalGeneration, Qwen3_5TextConfig
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)
    text = text_kwargs(**overrides)
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
    model = model.to(torch.bfloat16).eval()
    model.save_pretrained(path)
    write_byte_tokenizer(path)
    return path


def write_text(path: Path, chars: int, seed: int = 0) -> Path:
    """Random lowercase words: `chars` characters, one byte token each."""
    rng = random.Random(seed)
    words = []
    total = 0
    while total < chars:
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 8)))
        words.append(word)
        total += len(word) + 1
    path.write_text(" ".join(words)[:chars])
    return path

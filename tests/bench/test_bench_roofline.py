"""Byte and FLOP accounting of the benchmark's floors, checked against the independent numbers of
shared/docs/perf_anchors.md §1 for the real 27B geometry (built on the meta device: no memory)."""

from __future__ import annotations

import pytest
import torch

from fp4serve.bench.geometry import geometry_config, text_config
from fp4serve.bench.random_model import meta_model
from fp4serve.bench.roofline import Ceilings, decode_floor, footprint, prefill_floor

# the anchors' H100 SXM figures: 3.35 TB/s, 989 TFLOP/s dense BF16
H100 = Ceilings(
    copy_bytes_per_s=3.35e12, matmul_flops_per_s=989e12, copy_buffer_bytes=0, matmul_size=0, matmul_dtype="bfloat16"
)


def _footprint(quant: str, **overrides):
    config = text_config(geometry_config("27b", **overrides))
    model = meta_model(config, quant=quant, dtype=torch.bfloat16)
    fp = footprint(
        model,
        config,
        state_bytes_per_seq=model.state_bytes_per_slot(torch.bfloat16),
        kv_bytes_per_token=model.kv_bytes_per_token(torch.bfloat16),
    )
    return config, fp


def test_27b_geometry_matches_the_real_model():
    config = text_config(geometry_config("27b"))
    assert config.num_hidden_layers == 64 and config.hidden_size == 5120 and config.intermediate_size == 17408
    assert sum(config.is_full_attention(i) for i in range(64)) == 16
    assert [config.is_full_attention(i) for i in range(4)] == [False, False, False, True]
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (24, 4, 256)
    assert (config.linear_num_key_heads, config.linear_num_value_heads, config.linear_key_head_dim) == (16, 48, 128)
    assert config.rotary_dim == 64 and config.mrope_section == (11, 11, 10)
    assert not config.tie_word_embeddings and config.vocab_size == 248320
    assert text_config(geometry_config("27b", num_layers=8)).layer_types.count("full_attention") == 2


def test_weight_bytes_match_the_anchors():
    # §1.2 recipe A: 18.8 GB resident in NVFP4, 53.8 GB in BF16; §1.1: 24.35 B matmul weights, 1.271 B lm_head
    _, nvfp4 = _footprint("nvfp4")
    _, bf16 = _footprint("bf16")
    assert nvfp4.weight_bytes == pytest.approx(18.8e9, rel=0.005)
    assert bf16.weight_bytes == pytest.approx(53.8e9, rel=0.005)
    assert nvfp4.matmul_params == bf16.matmul_params == pytest.approx(24.35e9, rel=0.005)
    assert nvfp4.lm_head_params == 248320 * 5120
    # §1.2: 151 MB of fp32 recurrent state per sequence (+ ~3 MB conv state); §1.2: 64 KiB of bf16 KV per token
    assert nvfp4.state_bytes_per_seq == pytest.approx(154e6, rel=0.01)
    assert nvfp4.kv_bytes_per_token == 64 * 1024


def test_decode_floor_matches_the_anchors():
    _, fp = _footprint("nvfp4")
    # §1.3: recipe A at 1K context moves 16.65 GB per step -> 201 tok/s on an H100 SXM
    floor = decode_floor(fp, H100, batch=1, context_len=1024)
    assert floor.bytes == pytest.approx(16.65e9, rel=0.01)
    assert 1 / floor.seconds == pytest.approx(201, rel=0.01)
    assert floor.bound == "memory"
    # §1.4: batch 32, fp32 state, bf16 KV, 2K context -> 3,545 tok/s
    floor32 = decode_floor(fp, H100, batch=32, context_len=2048)
    assert 32 / floor32.seconds == pytest.approx(3545, rel=0.01)
    # more context, more bytes
    assert decode_floor(fp, H100, batch=1, context_len=32768).bytes > floor.bytes


def test_prefill_floor_is_compute_bound_at_the_anchor_rate():
    _, fp = _footprint("nvfp4")
    # §1.5: 48.7 GFLOP per token for the linears -> ~20.3k tok/s on 989 TFLOP/s (short prompts)
    floor = prefill_floor(fp, H100, prompt_lens=[2048] * 8, num_forwards=2)
    assert floor.bound == "compute"
    linear_flops = 2 * fp.matmul_params * 8 * 2048
    assert linear_flops / (8 * 2048) == pytest.approx(48.7e9, rel=0.005)
    assert floor.flops > linear_flops  # plus attention, the delta rule and the lm_head
    assert 8 * 2048 / floor.seconds == pytest.approx(20.3e3, rel=0.05)

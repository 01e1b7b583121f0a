"""Cache planning: budget parsing, auto-fit of max_model_len, and the errors for budgets that cannot fit."""

from __future__ import annotations

import logging

import pytest
import torch
from engine_fakes import FakeConfig, FakeModel

from fp4serve.config import AUTO_MAX_MODEL_LEN, EngineConfig, parse_max_model_len, parse_memory_size
from fp4serve.engine.engine import Engine
from fp4serve.engine.memory import plan_cache


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (4096, 4096),
        ("4096", 4096),
        ("64MiB", 64 << 20),
        ("2GB", 2 * 10**9),
        ("1.5 GiB", 3 << 29),
        ("512k", 512000),
        ("8KiB", 8192),
        (" 3 mb ", 3 * 10**6),
    ],
)
def test_parse_memory_size(text, expected):
    assert parse_memory_size(text) == expected


@pytest.mark.parametrize("bad", ["", "abc", "12 parsecs", "-5", 0, "0MiB", True])
def test_parse_memory_size_rejects(bad):
    with pytest.raises(ValueError, match="kv_cache_memory_bytes"):
        parse_memory_size(bad)


def test_parse_max_model_len():
    assert parse_max_model_len(None) is None
    assert parse_max_model_len(-1) == parse_max_model_len("auto") == parse_max_model_len("-1") == -1
    assert parse_max_model_len("32k") == 32000 and parse_max_model_len("32K") == 32768
    for bad in ("0", -2, "lots"):
        with pytest.raises(ValueError, match="max_model_len"):
            parse_max_model_len(bad)


def test_engine_config_create_checks_options():
    config = EngineConfig.create(kv_cache_memory_bytes="64MiB", max_model_len="auto")
    assert config.kv_cache_memory_bytes == 64 << 20 and config.max_model_len == -1
    with pytest.raises(ValueError, match="unknown engine option"):
        EngineConfig.create(max_num_seq=3)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        EngineConfig.create(gpu_memory_utilization=1.5)


def plan(budget: int, max_model_len: int | None, **kw: int):
    args = dict(
        kv_bytes_per_token=1000,
        state_bytes_per_slot=10_000,
        block_size=16,
        max_num_seqs=3,
        max_position_embeddings=4096,
    )
    args.update(kw)
    return plan_cache(budget_bytes=budget, max_model_len=max_model_len, **args)


def test_auto_fit_cuts_to_what_fits_and_logs(caplog):
    # 4 slots of state (3 seqs + spare) = 40 kB; 16 kB per block; 1 MB leaves 60 blocks = 960 tokens
    with caplog.at_level(logging.WARNING, logger="fp4serve.engine.memory"):
        p = plan(1_000_000, -1)
    assert p.num_slots == 4 and p.state_bytes == 40_000
    assert p.max_model_len == 960 and p.num_blocks == 60
    assert "Auto-fit max_model_len: reduced from 4096 to 960" in caplog.text
    assert p.total_bytes <= 1_000_000


def test_auto_fit_keeps_the_full_length_and_caps_unusable_blocks():
    p = plan(10**9, -1)
    assert p.max_model_len == 4096
    assert p.num_blocks == 3 * 4096 // 16, "no more blocks than max_num_seqs full sequences can use"


def test_explicit_length_that_does_not_fit_names_the_largest_that_does():
    assert plan(1_000_000, 960).max_model_len == 960
    with pytest.raises(ValueError, match="largest max_model_len that fits is 960"):
        plan(1_000_000, 961)
    with pytest.raises(ValueError, match="largest max_model_len that fits is 960") as error:
        plan(1_000_000, None)
    assert "max_num_seqs to at most" not in str(error.value)
    # 4096 tokens need 4.1 MB of KV: with 4.5 MB, fewer sequences' state would make room
    with pytest.raises(ValueError, match="lower max_num_seqs to at most 39"):
        plan(4_500_000, None, max_num_seqs=100)
    with pytest.raises(ValueError, match="max_position_embeddings=4096"):
        plan(10**9, 5000)


def test_budget_too_small_for_even_one_block():
    with pytest.raises(ValueError, match="too small"):
        plan(50_000, -1)


def test_engine_auto_fits_max_model_len_to_a_cpu_budget():
    model = FakeModel(FakeConfig(max_position_embeddings=4096))
    per_token = model.kv_bytes_per_token(torch.float32)
    state = model.state_bytes_per_slot(torch.float32) * 5
    budget = state + 100 * 16 * per_token + 7
    engine = Engine(
        model, EngineConfig.create(device="cpu", max_num_seqs=4, kv_cache_memory_bytes=budget, max_model_len=-1)
    )
    assert engine.max_model_len == 1600 and engine.stats().total_kv_blocks == 100
    with pytest.raises(ValueError, match="largest max_model_len that fits is 1600"):
        Engine(model, EngineConfig.create(device="cpu", max_num_seqs=4, kv_cache_memory_bytes=budget))
    with pytest.raises(ValueError, match="too small"):
        Engine(
            model,
            EngineConfig.create(device="cpu", max_num_seqs=4, kv_cache_memory_bytes=state + 10, max_model_len="auto"),
        )


def test_auto_fit_lowers_max_num_seqs_to_keep_the_full_context(caplog):
    # 27B-like numbers: 64 KiB of KV per token, 151 MB of DeltaNet state per sequence, 262144-token context
    state, kv, full = 48 * 48 * 128 * 128 * 4 + 48 * 10240 * 3 * 2, 65536, 262144
    budget = 39 * 10**9
    with caplog.at_level("WARNING"):
        plan = plan_cache(
            budget_bytes=budget,
            kv_bytes_per_token=kv,
            state_bytes_per_slot=state,
            block_size=16,
            max_num_seqs=256,
            max_model_len=AUTO_MAX_MODEL_LEN,
            max_position_embeddings=full,
        )
    assert plan.max_model_len == full
    seqs = plan.num_slots - 1
    assert 1 <= seqs < 256
    assert plan.state_bytes + plan.kv_bytes <= budget
    assert plan.num_blocks * 16 >= full  # one whole-context sequence fits next to the state of every slot
    assert (seqs + 2) * state + full * kv > budget  # and one more sequence would not
    assert "max_num_seqs reduced from 256" in caplog.text


def test_explicit_max_num_seqs_error_is_unchanged_without_auto_fit():
    with pytest.raises(ValueError, match="largest max_model_len that fits"):
        plan_cache(
            budget_bytes=10**9,
            kv_bytes_per_token=65536,
            state_bytes_per_slot=151 * 10**6,
            block_size=16,
            max_num_seqs=4,
            max_model_len=None,
            max_position_embeddings=262144,
        )

"""AsyncEngine on the fake model: concurrent streams, cancellation frees the cache, bad input, shutdown."""

from __future__ import annotations

import asyncio
import time

import pytest
from engine_fakes import greedy, next_token
from test_engine_fake import fake_engine

from fp4serve.engine.async_engine import AsyncEngine, EngineDeadError
from fp4serve.sampling import SamplingParams


def expected_tokens(prompt: list[int], n: int) -> list[int]:
    history = list(prompt)
    for _ in range(n):
        history.append(next_token(history, 64))
    return history[len(prompt) :]


async def collect(engine: AsyncEngine, rid: str, prompt: list[int], params: SamplingParams) -> tuple[list, str]:
    tokens, reason = [], None
    async for delta in engine.generate(rid, prompt, params):
        tokens.extend(delta.new_token_ids)
        reason = delta.finish_reason
    return tokens, reason


def wait_until(condition, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def test_concurrent_streams_match_the_reference():
    engine = AsyncEngine(fake_engine(num_blocks=40, budget=16))
    try:
        prompts = [[1 + i] * (3 + 5 * i) for i in range(6)]
        params = greedy(max_tokens=12, ignore_eos=True)

        async def main():
            return await asyncio.gather(*(collect(engine, f"r{i}", p, params) for i, p in enumerate(prompts)))

        results = asyncio.run(main())
        for prompt, (tokens, reason) in zip(prompts, results, strict=True):
            assert tokens == expected_tokens(prompt, 12) and reason == "length"
    finally:
        engine.shutdown()


def test_leaving_or_cancelling_a_stream_aborts_and_frees_the_cache():
    inner = fake_engine(num_blocks=40, budget=16)
    inner.model.step_delay_s = 0.005
    engine = AsyncEngine(inner)
    endless = greedy(max_tokens=None, ignore_eos=True)
    try:

        async def main():
            seen = 0
            async for delta in engine.generate("left", [5] * 10, endless):
                seen += len(delta.new_token_ids)
                if seen >= 2:
                    break
            started = asyncio.Event()

            async def consume():
                async for _ in engine.generate("cancelled", [3] * 4, endless):
                    started.set()

            task = asyncio.create_task(consume())
            await started.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(main())
        assert wait_until(lambda: not inner.has_unfinished())
        # both would have run to max_model_len (128 tokens each) without the aborts
        assert inner.model.num_forward_tokens < 100
        stats = engine.stats()
        assert stats.used_kv_blocks == 0 and stats.used_state_slots == 0
    finally:
        engine.shutdown()


def test_bad_request_raises_and_the_engine_keeps_serving():
    engine = AsyncEngine(fake_engine(num_blocks=40, budget=16))
    try:

        async def main():
            with pytest.raises(ValueError, match="empty"):
                await collect(engine, "bad", [], greedy())
            return await collect(engine, "good", [7, 8], greedy(max_tokens=3, ignore_eos=True))

        assert asyncio.run(main()) == (expected_tokens([7, 8], 3), "length")
    finally:
        engine.shutdown()


def test_shutdown_ends_open_streams():
    engine = AsyncEngine(fake_engine(num_blocks=40, budget=16))

    async def main():
        task = asyncio.create_task(collect(engine, "r", [1], greedy(max_tokens=None, ignore_eos=True)))
        await asyncio.sleep(0.05)
        await asyncio.to_thread(engine.shutdown)
        with pytest.raises(EngineDeadError):
            await task
        with pytest.raises(EngineDeadError):
            await collect(engine, "late", [1], greedy())

    asyncio.run(main())
    assert not engine.is_running

"""Concurrency, disconnects and overload: every request leaves the engine and its cache is freed."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from conftest import derived_state, engine_idle, start_server

MESSAGES = [{"role": "user", "content": "Write about Bath."}]


def test_fifty_concurrent_streaming_clients(demo):
    from openai import AsyncOpenAI

    async def one(client: AsyncOpenAI, i: int) -> tuple[int, str | None, int]:
        stream = await client.chat.completions.create(
            model="fp4serve-demo",
            messages=MESSAGES,
            max_tokens=6,
            temperature=0.7,
            seed=i,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        pieces, finish, used = 0, None, -1
        async for chunk in stream:
            if chunk.usage is not None:
                used = chunk.usage.completion_tokens
            for choice in chunk.choices:
                pieces += 1
                finish = choice.finish_reason or finish
        return pieces, finish, used

    async def main() -> list[tuple[int, str | None, int]]:
        async with AsyncOpenAI(base_url=demo.v1, api_key="x", max_retries=0, timeout=300) as client:
            return await asyncio.gather(*(one(client, i) for i in range(50)))

    results = asyncio.run(main())
    assert len(results) == 50
    assert all(finish == "length" and used == 6 and pieces >= 2 for pieces, finish, used in results)
    assert engine_idle(demo.state)
    stats = demo.state.stats()
    assert stats.used_kv_blocks == 0 and stats.used_state_slots == 0
    assert demo.state.admission.waiting == 0 and demo.state.admission.in_flight == 0


def _raw_request(url: str, path: str, body: dict) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    sock.sendall(head.encode() + data)
    return sock


def _wait_running(state, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if state.stats().num_running > 0:
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize(("stream", "n"), [(True, 1), (True, 2), (False, 2)])
def test_client_killed_mid_request_frees_it(demo, stream, n):
    assert engine_idle(demo.state)
    body = {"messages": MESSAGES, "max_tokens": 3000, "ignore_eos": True, "stream": stream, "n": n}
    sock = _raw_request(demo.url, "/v1/chat/completions", body)
    if stream:
        # read until the first event arrived: the request is running and streaming
        received = b""
        while b"data:" not in received:
            received += sock.recv(4096)
    assert _wait_running(demo.state)
    time.sleep(0.2)
    sock.close()
    assert engine_idle(demo.state, timeout_s=30)
    stats = demo.state.stats()
    assert stats.used_kv_blocks == 0 and stats.used_state_slots == 0
    assert demo.state.admission.in_flight == 0


def test_overload_gets_503_not_a_hang(base_state):
    live = start_server(derived_state(base_state, max_waiting_requests=2))
    try:
        body = {"prompt": "Mr. Knightley", "max_tokens": 4, "ignore_eos": True}

        def send(_: int) -> requests.Response:
            return requests.post(f"{live.v1}/completions", json=body, timeout=120)

        with ThreadPoolExecutor(24) as pool:
            responses = list(pool.map(send, range(24)))
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 503} and 503 in codes and 200 in codes
        error = next(r for r in responses if r.status_code == 503).json()["error"]
        assert error["code"] == 503 and "overloaded" in error["message"]
        assert all(r.json()["usage"]["completion_tokens"] == 4 for r in responses if r.status_code == 200)
        assert live.state.admission.waiting == 0
        assert live.state.metrics.rejected == codes.count(503)
        assert engine_idle(live.state)
    finally:
        live.stop()

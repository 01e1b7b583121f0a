"""The real command: `fp4serve serve` with the model card's flags starts, answers the openai client, and stops."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import requests
from conftest import demo_model_dir


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_command_with_model_card_flags(shared_dir):
    from openai import OpenAI

    port = free_port()
    command = [
        sys.executable, "-m", "fp4serve", "serve", str(demo_model_dir(shared_dir)),
        "--gpu-memory-utilization", "0.75", "--max-model-len", "-1", "--enable-auto-tool-choice",
        "--tool-call-parser", "qwen3_coder", "--reasoning-parser", "qwen3", "--served-model-name", "qwen3.5-27b",
        "--trust-remote-code", "--device", "cpu", "--kv-cache-memory", "64MiB", "--max-num-seqs", "4",
        "--host", "127.0.0.1", "--port", str(port), "--uvicorn-log-level", "warning",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.25)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        (model,) = client.models.list().data
        assert model.id == "qwen3.5-27b" and model.model_dump()["max_model_len"] == 4096
        response = client.chat.completions.create(
            model="qwen3.5-27b", messages=[{"role": "user", "content": "Hello"}], max_tokens=2
        )
        assert response.usage.completion_tokens <= 2 and response.choices[0].finish_reason in ("stop", "length")
    finally:
        process.send_signal(signal.SIGINT)
        try:
            output, _ = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
    assert process.returncode == 0, output

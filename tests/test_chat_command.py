"""`fp4serve chat` end to end: a real process, the real fixture model, lines on stdin."""

from __future__ import annotations

import subprocess
import sys


def _chat(model_dir, stdin: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "fp4serve", "chat", str(model_dir), "--max-tokens", "6", "--seed", "0"]
    cmd += ["--device", "cpu", "--kv-cache-memory", "32MiB", *extra]
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=300)


def test_chat_streams_replies_and_handles_commands(shared_dir):
    model = shared_dir / "fixtures" / "austen-qwen35-demo"
    done = _chat(model, "Who is Mr. Darcy?\n/reset\nAnd Emma?\n", "--no-think")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "(history cleared)" in lines
    before, after = done.stdout.split("(history cleared)")
    assert before.strip() and after.strip()  # one streamed reply on each side of the reset
    assert "[thinking]" not in done.stdout


def test_chat_shows_reasoning_when_thinking(shared_dir):
    model = shared_dir / "fixtures" / "austen-qwen35-demo"
    done = _chat(model, "Hello\n")
    assert done.returncode == 0, done.stderr
    # the demo model never closes its think block in 6 tokens, so everything it says is reasoning
    assert done.stdout.startswith("[thinking] ")


def test_chat_rejects_a_missing_model(tmp_path):
    done = _chat(tmp_path / "nope", "hi\n")
    assert done.returncode == 2
    assert "nope" in done.stderr

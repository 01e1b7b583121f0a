"""Real HTTP servers for the server tests: one engine for the whole session, several apps around it.

The model is loaded once (the bundled demo when it exists, else the shared austen-qwen35-demo fixture, the model
the demo is made from) and one `AsyncEngine` serves every app; each app runs in its own uvicorn thread on a free
port. Apps differ only in server settings (API key, overload limit), which is cheap.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import requests
import uvicorn

from fp4serve.commands.serve import DEMO_MODEL_DIR, DEMO_SERVED_NAME
from fp4serve.config import EngineConfig
from fp4serve.server.api import build_app
from fp4serve.server.launch import build_state
from fp4serve.server.settings import ServerSettings
from fp4serve.server.state import ServerState

MAX_NUM_SEQS = 64


@dataclass
class LiveServer:
    url: str
    state: ServerState
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def start_server(state: ServerState) -> LiveServer:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(build_app(state), log_level="warning", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    return LiveServer(f"http://127.0.0.1:{port}", state, server, thread)


def demo_model_dir(shared: Path) -> Path:
    if (DEMO_MODEL_DIR / "config.json").is_file():
        return DEMO_MODEL_DIR
    return shared / "fixtures" / "austen-qwen35-demo"


@pytest.fixture(scope="session")
def base_state(shared_dir: Path) -> ServerState:
    model_dir = demo_model_dir(shared_dir)
    settings = ServerSettings(
        served_model_names=(DEMO_SERVED_NAME,),
        model_root=str(model_dir),
        enable_auto_tool_choice=True,
        tool_call_parser="qwen3_coder",
        reasoning_parser="qwen3",
        version="test",
    )
    config = EngineConfig.create(device="cpu", max_num_seqs=MAX_NUM_SEQS, kv_cache_memory_bytes="128MiB")
    state = build_state(model_dir, settings, config)
    yield state
    state.engine.shutdown()


def derived_state(base: ServerState, **changes: object) -> ServerState:
    """Another app's state around the same engine and tokenizer, with some settings changed."""
    settings = replace(base.settings, **changes)
    return ServerState(
        settings,
        base.engine,
        base.tokenizer,
        base.template,
        base.generation_config,
        base.max_model_len,
        base.vocab_size,
    )


@pytest.fixture(scope="session")
def demo(base_state: ServerState) -> LiveServer:
    live = start_server(base_state)
    yield live
    live.stop()


@pytest.fixture(scope="session")
def keyed(base_state: ServerState) -> LiveServer:
    live = start_server(derived_state(base_state, api_key="sesame"))
    yield live
    live.stop()


@pytest.fixture(scope="session")
def client(demo: LiveServer):
    from openai import OpenAI

    return OpenAI(base_url=demo.v1, api_key="unused", max_retries=0, timeout=120)


def engine_idle(state: ServerState, timeout_s: float = 20.0) -> bool:
    """Wait until the engine holds no requests, no KV blocks and no state slots."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = state.stats()
        idle = stats.num_running == 0 and stats.num_waiting == 0
        if idle and stats.used_kv_blocks == 0 and stats.used_state_slots == 0:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def post(live: LiveServer, path: str, body: object, **kwargs: object) -> requests.Response:
    return requests.post(f"{live.url}{path}", json=body, timeout=120, **kwargs)

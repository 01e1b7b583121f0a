"""Everything a route needs, built once at start-up: settings, engine, tokenizer, template, defaults, metrics.

One `ServerState` object is handed to the app factory (no module globals), so tests can build several servers in
one process and every route sees the same engine and counters.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from fp4serve.server.errors import APIError
from fp4serve.server.generation import Admission, Generation
from fp4serve.server.metrics import Metrics
from fp4serve.server.settings import ServerSettings
from fp4serve.tokenizer import Tokenizer

logger = logging.getLogger("fp4serve.server")


@dataclass
class ServerState:
    settings: ServerSettings
    engine: Any  # AsyncEngine: generate / abort / stats
    tokenizer: Tokenizer
    template: Any  # ChatTemplate, or None when the checkpoint has none (chat endpoints then answer 400)
    generation_config: dict[str, Any]
    max_model_len: int
    vocab_size: int
    media_config: Any = None  # MediaConfig when the model has a vision tower, else None (media refused)
    vision_ids: Any = None  # VisionTokenIds of the checkpoint
    metrics: Metrics = field(init=False)
    admission: Admission = field(init=False)
    generation: Generation = field(init=False)
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.metrics = Metrics(self.settings.model_name, self.gauges)
        self.admission = Admission(self.settings.max_waiting_requests)
        self.generation = Generation(self.engine, self.tokenizer, self.metrics, self.admission)
        self.token_text = lru_cache(maxsize=65536)(self._token_text)

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def check_model(self, name: str | None) -> None:
        if name is None or name == "" or name in self.settings.served_model_names:
            return
        raise APIError(f"The model `{name}` does not exist.", 404, "NotFoundError", "model")

    def request_id(self, given: str | None) -> str:
        return given or secrets.token_hex(8)

    def stats(self) -> Any:
        return self.engine.stats()

    def gauges(self) -> dict[str, float]:
        stats = self.stats()
        total = max(int(stats.total_kv_blocks), 1)
        return {
            "vllm:num_requests_running": float(stats.num_running),
            "vllm:num_requests_waiting": float(stats.num_waiting),
            "vllm:kv_cache_usage_perc": float(stats.used_kv_blocks) / total,
        }

    def is_healthy(self) -> bool:
        return bool(self.engine.is_running)

    def log_exception(self, exc: BaseException) -> None:
        logger.error("request failed", exc_info=exc)

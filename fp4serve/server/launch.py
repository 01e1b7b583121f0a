"""Start-up: load the checkpoint into an engine, build the app around it, and run uvicorn until interrupted.

`build_state` is the one place that wires the pieces together (tokenizer, chat template, generation defaults,
engine and its background thread), shared by `fp4serve serve` and the tests, which run the same app in a thread.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from fp4serve.config import EngineConfig
from fp4serve.server.settings import ServerSettings
from fp4serve.server.state import ServerState

logger = logging.getLogger("fp4serve.server")


def build_state(
    model_dir: str | Path, settings: ServerSettings, config: EngineConfig, *, use_generation_config: bool = True
) -> ServerState:
    from fp4serve.chat_template import ChatTemplate
    from fp4serve.engine.async_engine import AsyncEngine
    from fp4serve.engine.engine import Engine
    from fp4serve.sampling import GenerationDefaults
    from fp4serve.tokenizer import Tokenizer

    model_dir = Path(model_dir)
    engine = Engine.from_pretrained(model_dir, config)
    # the engine detokenizes (stop strings) with its own copy of the tokenizer; share it
    tokenizer = getattr(engine, "tokenizer", None) or Tokenizer.from_dir(model_dir)
    try:
        template = ChatTemplate.from_dir(model_dir)
    except ValueError as exc:
        logger.warning("no chat template (%s): /v1/chat/completions will answer 400", exc)
        template = None
    defaults = GenerationDefaults.from_dir(model_dir).as_dict() if use_generation_config else {}
    vocab_size = engine.vocab_size or tokenizer.vocab_size
    media_config, vision_ids = _vision(model_dir, settings, has_vision=getattr(engine, "visual", None) is not None)
    return ServerState(
        settings,
        AsyncEngine(engine),
        tokenizer,
        template,
        defaults,
        engine.max_model_len,
        vocab_size,
        media_config=media_config,
        vision_ids=vision_ids,
    )


def _vision(model_dir: Path, settings: ServerSettings, *, has_vision: bool) -> tuple[object, object]:
    """Media preprocessing settings and vision token ids when the engine loaded a vision tower; else (None, None)."""
    if not has_vision:
        return None, None
    from fp4serve.model.media import MediaConfig
    from fp4serve.model.multimodal import VisionTokenIds

    config = json.loads((model_dir / "config.json").read_text())
    media = MediaConfig.from_dir(
        model_dir,
        allow_http=settings.allow_http_media,
        allowed_local_media_path=settings.allowed_local_media_path,
    )
    return media, VisionTokenIds.from_config(config)


def serve_forever(
    model_dir: str | Path,
    settings: ServerSettings,
    config: EngineConfig,
    *,
    host: str,
    port: int,
    log_level: str = "info",
    use_generation_config: bool = True,
) -> None:
    import uvicorn

    from fp4serve.server.api import build_app

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    state = build_state(model_dir, settings, config, use_generation_config=use_generation_config)
    logger.info(
        "serving %s as %r (max_model_len %d) on http://%s:%d",
        model_dir,
        settings.model_name,
        state.max_model_len,
        host,
        port,
    )
    try:
        uvicorn.run(build_app(state), host=host, port=port, log_level=log_level)
    finally:
        state.engine.shutdown()

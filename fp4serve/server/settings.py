"""Server-side settings: what the HTTP layer needs to know that is not the engine's business.

`ServerSettings` is filled once from the command line by `fp4serve serve` (or by tests) and handed to the app
factory; the engine's own knobs (and the parsing of `32k` / `8GiB` spellings) live in `fp4serve.config.EngineConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SUPPORTED_TOOL_PARSERS = ("qwen3_coder",)
SUPPORTED_REASONING_PARSERS = ("qwen3",)
MAX_LOGPROBS = 20


@dataclass(frozen=True)
class ServerSettings:
    """Knobs of the HTTP layer; the first served name is the one every response carries."""

    served_model_names: tuple[str, ...]
    model_root: str
    api_key: str | None = None
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    max_waiting_requests: int | None = None
    max_logprobs: int = MAX_LOGPROBS
    allow_http_media: bool = False
    # directory whose files requests may name as images/videos (paths or file:// URLs); None: no local files
    allowed_local_media_path: str | None = None
    enable_force_include_usage: bool = False
    exclude_tools_when_tool_choice_none: bool = False
    version: str = ""

    def __post_init__(self) -> None:
        if not self.served_model_names or not all(self.served_model_names):
            raise ValueError("--served-model-name: give at least one non-empty name")
        if self.tool_call_parser is not None and self.tool_call_parser not in SUPPORTED_TOOL_PARSERS:
            raise ValueError(
                f"--tool-call-parser {self.tool_call_parser!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_TOOL_PARSERS)}"
            )
        if self.reasoning_parser is not None and self.reasoning_parser not in SUPPORTED_REASONING_PARSERS:
            raise ValueError(
                f"--reasoning-parser {self.reasoning_parser!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_REASONING_PARSERS)}"
            )
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("--enable-auto-tool-choice requires --tool-call-parser (supported: qwen3_coder)")
        if self.max_waiting_requests is not None and self.max_waiting_requests < 0:
            raise ValueError(f"--max-waiting-requests must be >= 0, got {self.max_waiting_requests}")
        if self.allowed_local_media_path is not None and not Path(self.allowed_local_media_path).is_dir():
            raise ValueError(f"--allowed-local-media-path {self.allowed_local_media_path!r} is not a directory")
        if self.max_logprobs < 0:
            raise ValueError(f"--max-logprobs must be >= 0, got {self.max_logprobs}")

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    @property
    def auto_tools(self) -> bool:
        return self.enable_auto_tool_choice and self.tool_call_parser is not None

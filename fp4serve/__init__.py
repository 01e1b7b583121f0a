"""fp4serve: quantize Qwen3.5 to NVFP4 and serve it through an OpenAI-compatible API.

The public surface is small on purpose: `LLM` (offline generation) and `SamplingParams`. They are imported
lazily so that `fp4serve --version` and the parsers do not pay for importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]

if TYPE_CHECKING:
    from fp4serve.llm import LLM
    from fp4serve.sampling import SamplingParams


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from fp4serve.llm import LLM

        return LLM
    if name == "SamplingParams":
        from fp4serve.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'fp4serve' has no attribute {name!r}")

"""Fixtures for the parser tests: the real Qwen3.5 tokenizer, to replay outputs token by token."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def token_split(shared_dir: Path) -> Callable[[str], list[str]]:
    """Split a text at the Qwen3.5 tokenizer's token boundaries (what the engine's detokenizer delivers)."""
    tokenizers = pytest.importorskip("tokenizers")
    path = shared_dir / "assets" / "qwen3_5_tokenizer" / "tokenizer.json"
    if not path.is_file():
        pytest.skip(f"{path} is not present")
    tokenizer = tokenizers.Tokenizer.from_file(str(path))

    def split(text: str) -> list[str]:
        offsets = tokenizer.encode(text, add_special_tokens=False).offsets
        cuts = sorted({start for start, _ in offsets if 0 < start < len(text)})
        bounds = [0, *cuts, len(text)]
        return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]

    return split

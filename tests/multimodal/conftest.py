"""Fixtures for the multimodal end-to-end tests: the tiny fp32 and NVFP4-text/BF16-vision checkpoints, built once."""

from __future__ import annotations

from pathlib import Path

import pytest
from mm_harness import Checkpoints, build_checkpoints


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, shared_dir: Path) -> Checkpoints:
    return build_checkpoints(tmp_path_factory.mktemp("qwen35_mm"), shared_dir)

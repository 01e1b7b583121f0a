"""Fixtures for the vision tests: a tiny random transformers Qwen3.5 (vision tower included) as golden reference."""

from __future__ import annotations

import pytest
from vision_harness import build_hf_model


@pytest.fixture(scope="session")
def hf_model():
    return build_hf_model()

"""Shared pytest configuration: GPU tests skip without CUDA; paths to ../shared fixtures.

Without CUDA, Triton kernels run in Triton's CPU interpreter. TRITON_INTERPRET is read when `triton.jit` decorates a
function, including triton.language's own helpers at `import triton`, so it is set here, in the first conftest
pytest loads, before any test module (or a library such as modelopt) can import triton.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# `import torch` does not import triton, so this still runs before anything decorates a kernel
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared is not present")
    return SHARED

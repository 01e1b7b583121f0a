"""Kernel tests: without CUDA, run the Triton kernels in Triton's CPU interpreter.

TRITON_INTERPRET must be set before `@triton.jit` runs (it decides at decoration time), so it is set here, at
collection of this directory, and any fp4serve.ops.triton module imported earlier is re-imported. Nothing else in the
suite runs Triton kernels on CPU, so the variable does not change other directories' behaviour.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None

if not HAS_TRITON:
    collect_ignore_glob = ["test_*.py"]
elif not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
    for _name in sorted(m for m in sys.modules if m.startswith("fp4serve.ops.triton.")):
        importlib.reload(sys.modules[_name])


@pytest.fixture
def device() -> str:
    """Where the small (interpreter-sized) checks run: the GPU when there is one, else the CPU interpreter."""
    return "cuda" if HAS_CUDA else "cpu"

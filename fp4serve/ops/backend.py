"""Where an op runs: the Triton kernels of `fp4serve.ops.triton` for CUDA tensors, else the PyTorch reference.

Every public op in `fp4serve.ops` asks `use_kernels(x)` and imports its kernel module only when the answer is yes,
so the CPU path never imports Triton (it is an optional dependency: only the test extras install it). Anything a
kernel does not support (a dtype, a head size, an activation mode) falls back to the reference inside the op.
"""

from __future__ import annotations

import functools
import importlib.util

import torch


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_kernels(x: torch.Tensor) -> bool:
    """True when `x` lives on a CUDA device and Triton can be imported."""
    return x.is_cuda and triton_available()


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0

"""SwiGLU activation of the MLP: `silu(gate) * up`.

Projections are kept separate (no fused gate_up weight) so each one can be BF16 or NVFP4 on its own; the op takes
the two outputs. The public function calls the reference until a fused kernel exists.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return silu_and_mul_ref(gate, up)

"""Check the tensors of one NVFP4 Linear in a checkpoint before loading them, with errors that name the tensor.

Works from a `CheckpointReader` (dtypes and shapes from the headers, only the 0-d scales are read) or from a mapping
of name -> tensor. The expected layout is ModelOpt's (nvfp4_format.md section 3.1): `weight` uint8 [N, K/2],
`weight_scale` float8_e4m3fn [N, K/16], `weight_scale_2` float32 scalar, optional `input_scale` float32 scalar.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from fp4serve.checkpoint.safetensors_io import CheckpointReader
from fp4serve.quant.nvfp4 import BLOCK_SIZE

TensorSource = CheckpointReader | Mapping[str, torch.Tensor]


def _lookup(source: TensorSource, name: str) -> tuple[torch.dtype, tuple[int, ...]] | None:
    if isinstance(source, CheckpointReader):
        return (source.dtype(name), tuple(source.shape(name))) if name in source else None
    tensor = source.get(name)
    return None if tensor is None else (tensor.dtype, tuple(tensor.shape))


def _scalar(source: TensorSource, name: str) -> float:
    tensor = source.get(name)
    return float(tensor.reshape(()))


def validate_nvfp4_tensors(
    prefix: str,
    source: TensorSource,
    out_features: int,
    in_features: int,
    *,
    require_input_scale: bool = False,
) -> None:
    """Raise one ValueError listing every problem with `<prefix>.{weight,weight_scale,weight_scale_2,input_scale}`."""
    if in_features % BLOCK_SIZE:
        raise ValueError(f"{prefix}: in_features {in_features} is not a multiple of the NVFP4 block size {BLOCK_SIZE}")
    expected = {
        "weight": (torch.uint8, (out_features, in_features // 2)),
        "weight_scale": (torch.float8_e4m3fn, (out_features, in_features // BLOCK_SIZE)),
        "weight_scale_2": (torch.float32, ()),
        "input_scale": (torch.float32, ()),
    }
    problems: list[str] = []
    for leaf, (dtype, shape) in expected.items():
        name = f"{prefix}.{leaf}"
        found = _lookup(source, name)
        if found is None:
            if leaf != "input_scale" or require_input_scale:
                problems.append(f"{name} is missing")
            continue
        got_dtype, got_shape = found
        shape_ok = got_shape in ((), (1,)) if shape == () else got_shape == shape
        if got_dtype != dtype or not shape_ok:
            problems.append(
                f"{name} is {got_dtype} {list(got_shape)}, expected {dtype} {list(shape)} for an NVFP4 Linear "
                f"with in_features={in_features}, out_features={out_features}"
            )
        elif shape == ():
            value = _scalar(source, name)
            # weight_scale_2 is 0 only for an all-zero weight; an activation scale must be positive
            if not math.isfinite(value) or value < 0 or (leaf == "input_scale" and value == 0):
                problems.append(f"{name} = {value} is not a valid scale")
    if problems:
        raise ValueError(f"NVFP4 module {prefix}: " + "; ".join(problems))

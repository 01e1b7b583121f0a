"""The whole model with every op on its kernel path against the same model on the reference path.

A tiny random NVFP4 model runs a prefill step (fresh prompts of different lengths) and then a decode step of the
same sequences, once with the ops on their references and once with the Triton kernels (in the CPU interpreter
without CUDA: `use_kernels` switched on for CPU tensors). This checks the model-level wiring the GPU takes: strided
q/k views into the fused DeltaNet decode kernel, the fused residual norms, the conv state layout, block tables into
the decode attention kernel, the in-place NVFP4 weight repack, and the caches both paths leave. It runs in float32
(the NVFP4 GEMM, bf16/fp16-only in serving, is allowed fp32 here) so that the only differences are summation
order: the interpreter rounds bf16 by truncation, which a random model amplifies through its layers.
"""

from __future__ import annotations

import copy

import pytest
import torch

from fp4serve.bench.geometry import geometry_config, text_config
from fp4serve.bench.random_model import build_random_model
from fp4serve.engine.batch import ForwardBatch
from fp4serve.model.linear import NVFP4Linear
from fp4serve.ops import attention, conv1d, gdn, norm, nvfp4


def _batch(starts: list[int], ends: list[int], tables: list[list[int]], device: str, seed: int) -> ForwardBatch:
    bs = 16
    gen = torch.Generator().manual_seed(seed)
    spans = list(zip(starts, ends, strict=True))
    ids = torch.randint(0, 256, (sum(e - s for s, e in spans),), generator=gen)
    pos = [p for s, e in spans for p in range(s, e)]
    slots = [tables[i][p // bs] * bs + p % bs for i, (s, e) in enumerate(spans) for p in range(s, e)]
    cu = [0]
    for s, e in spans:
        cu.append(cu[-1] + e - s)
    queries = tuple(e - s for s, e in spans)

    def dev(values: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=device)

    return ForwardBatch(
        input_ids=ids.to(device),
        positions=dev([pos] * 3, torch.int64),
        cu_seqlens=dev(cu, torch.int32),
        context_lens=dev(starts, torch.int32),
        seq_lens=dev(ends, torch.int32),
        slot_mapping=dev(slots, torch.int64),
        block_tables=dev(tables, torch.int32),
        state_indices=dev(list(range(len(spans))), torch.int64),
        has_initial_state=dev([s > 0 for s in starts], torch.bool),
        logits_indices=dev([c - 1 for c in cu[1:]], torch.int64),
        query_lens=queries,
        context_lens_host=tuple(starts),
        max_query_len=max(queries),
        max_seq_len=max(ends),
    )


def _run(model: torch.nn.Module, device: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    lens = [5, 9, 1]
    tables = [[0, 1], [2, 3], [4, 5]]
    cache = model.allocate_cache(8, 16, 4, device, torch.float32)
    steps = [_batch([0] * 3, lens, tables, device, 0), _batch(lens, [n + 1 for n in lens], tables, device, 1)]
    with torch.inference_mode():
        hidden = [model(b, cache).float() for b in steps]
    states = [t.float() for t in (*cache.kv, *cache.conv, *cache.ssm) if t is not None]
    return hidden, states


def test_kernel_path_matches_reference_path(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # the same switch both ways, so on a GPU the reference path runs there too
    # the tiny geometry, narrower (the interpreter's time grows with every width)
    shape = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
    }
    config_dict = {**geometry_config("tiny", vocab_size=256), **shape}
    config_dict["rope_parameters"] = {**config_dict["rope_parameters"], "mrope_section": [2, 1, 1]}
    config = text_config(config_dict)
    model = build_random_model(config, quant="nvfp4", device=device, dtype=torch.float32, seed=0)
    reference = copy.deepcopy(model)
    monkeypatch.setattr(nvfp4, "KERNEL_DTYPES", (*nvfp4.KERNEL_DTYPES, torch.float32))
    for module in (norm, conv1d, gdn, attention, nvfp4):
        monkeypatch.setattr(module, "use_kernels", lambda x: False)
    ref_hidden, ref_states = _run(reference, device)
    for module in (norm, conv1d, gdn, attention, nvfp4):
        monkeypatch.setattr(module, "use_kernels", lambda x: True)
    hidden, states = _run(model, device)
    for out, ref in zip(hidden + states, ref_hidden + ref_states, strict=True):
        # on a GPU the attention dot runs in tf32 and the tensor-core GEMM feeds fp16 operands
        assert float((out - ref).norm() / ref.norm()) < (1e-4 if device == "cpu" else 2e-2)
    repacked = [m._kernel is not None for m in model.modules() if isinstance(m, NVFP4Linear)]
    assert repacked and all(repacked)

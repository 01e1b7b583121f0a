"""The ForwardBatch the runner builds from a scheduled step: every field, for a mixed prefill/decode batch."""

from __future__ import annotations

import torch
from engine_fakes import FakeModel, greedy

from fp4serve.engine.memory import CachePlan
from fp4serve.engine.request import Request
from fp4serve.engine.runner import ModelRunner
from fp4serve.engine.scheduler import ScheduledBatch, ScheduledRequest
from fp4serve.model.multimodal import MultimodalPrompt


def make_runner() -> ModelRunner:
    runner = ModelRunner(FakeModel(), device=torch.device("cpu"), dtype=torch.float32, block_size=4)
    runner.allocate_cache(
        CachePlan(num_blocks=16, block_size=4, num_slots=5, max_model_len=64, kv_bytes=0, state_bytes=0)
    )
    return runner


def test_prepare_mixed_batch():
    runner = make_runner()
    decode = Request(
        "d",
        [1, 2, 3, 4, 5],
        greedy(),
        token_ids=[1, 2, 3, 4, 5, 6],
        num_computed_tokens=5,
        block_table=[7, 2],
        state_slot=3,
    )
    chunk = Request("c", list(range(10, 20)), greedy(), block_table=[0, 5, 9], state_slot=1)
    batch = ScheduledBatch((ScheduledRequest(decode, 5, 1, True), ScheduledRequest(chunk, 0, 6, False)))
    fb = runner.prepare(batch)
    assert fb.input_ids.tolist() == [6, 10, 11, 12, 13, 14, 15]
    assert fb.positions.tolist() == [[5, 0, 1, 2, 3, 4, 5]] * 3
    assert fb.cu_seqlens.tolist() == [0, 1, 7] and fb.cu_seqlens.dtype == torch.int32
    assert fb.context_lens.tolist() == [5, 0] and fb.seq_lens.tolist() == [6, 6]
    assert fb.slot_mapping.tolist() == [2 * 4 + 1, 0, 1, 2, 3, 5 * 4, 5 * 4 + 1]
    # only the blocks covering each sequence's seq_len, padded with block 0
    assert fb.block_tables.tolist() == [[7, 2], [0, 5]]
    assert fb.state_indices.tolist() == [3, 1]
    assert fb.has_initial_state.tolist() == [True, False]
    assert fb.logits_indices.tolist() == [0]
    assert fb.query_lens == (1, 6) and fb.context_lens_host == (5, 0)
    assert fb.max_query_len == 6 and fb.max_seq_len == 6 and not fb.is_decode_only


def test_prepare_takes_mrope_positions_from_a_multimodal_prompt():
    runner = make_runner()
    positions = torch.tensor([[0, 1, 1, 1, 1, 3], [0, 1, 1, 2, 2, 3], [0, 1, 2, 1, 2, 3]])
    prompt = MultimodalPrompt(
        token_ids=[1, 9, 9, 9, 9, 2],
        positions=positions,
        rope_delta=-2,
        mm_token_positions=torch.tensor([1, 2, 3, 4]),
        pixel_values=torch.empty(0, 0),
        grid_thw=torch.empty(0, 3, dtype=torch.int64),
        items=(),
    )
    request = Request(
        "m",
        prompt.token_ids,
        greedy(),
        token_ids=[*prompt.token_ids, 7],
        num_computed_tokens=4,
        block_table=[0, 1],
        state_slot=0,
        mm_inputs=prompt,
    )
    fb = runner.prepare(ScheduledBatch((ScheduledRequest(request, 4, 3, True),)))
    assert fb.positions.tolist() == [[1, 3, 4], [2, 3, 4], [2, 3, 4]]

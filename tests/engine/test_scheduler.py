"""Scheduler and cache bookkeeping, pure Python: budgets, chunking, mixed batches, preemption, abort, stop rules."""

from __future__ import annotations

import pytest
from engine_fakes import greedy

from fp4serve.engine.kv_cache import BlockManager, StateSlots, token_slots
from fp4serve.engine.request import Request, RequestStatus, check_stop
from fp4serve.engine.scheduler import ScheduledBatch, Scheduler


def make_scheduler(
    num_blocks: int = 64, block_size: int = 4, max_num_seqs: int = 4, budget: int = 16, max_model_len: int = 64
) -> Scheduler:
    return Scheduler(
        BlockManager(num_blocks, block_size),
        StateSlots(max_num_seqs),
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget,
        max_model_len=max_model_len,
        eos_token_ids=(0,),
    )


def req(rid: str, n: int, **params: object) -> Request:
    return Request(rid, list(range(1, n + 1)), greedy(**params))  # type: ignore[arg-type]


def plan(batch: ScheduledBatch) -> list[tuple[str, int, int, bool]]:
    return [(e.request.request_id, e.start, e.num_tokens, e.sample) for e in batch.entries]


def run_step(s: Scheduler, token: int = 7) -> ScheduledBatch:
    batch = s.schedule()
    s.update(batch, {e.request.request_id: token for e in batch.entries if e.sample})
    return batch


def test_chunked_prefill_samples_only_at_the_end_of_the_prompt():
    s = make_scheduler(budget=4)
    s.add_request(req("a", 10, max_tokens=2))
    assert plan(run_step(s)) == [("a", 0, 4, False)]
    assert plan(run_step(s)) == [("a", 4, 4, False)]
    assert plan(run_step(s)) == [("a", 8, 2, True)]
    assert s.requests["a"].output_token_ids == [7]
    assert plan(run_step(s)) == [("a", 10, 1, True)]
    assert not s.has_unfinished()
    assert s.blocks.num_free_blocks == 64 and s.slots.num_free_slots == 4


def test_running_decodes_go_first_and_prefill_takes_the_rest_of_the_budget():
    s = make_scheduler(budget=8)
    s.add_request(req("a", 3))
    run_step(s)
    s.add_request(req("b", 20))
    s.add_request(req("c", 2))
    # a decodes (1), b gets the remaining 7 as a chunk, c waits for budget
    assert plan(run_step(s)) == [("a", 3, 1, True), ("b", 0, 7, False)]
    assert plan(run_step(s)) == [("a", 4, 1, True), ("b", 7, 7, False)]
    assert plan(run_step(s)) == [("a", 5, 1, True), ("b", 14, 6, True), ("c", 0, 1, False)]
    assert plan(run_step(s)) == [("a", 6, 1, True), ("b", 20, 1, True), ("c", 1, 1, True)]


def test_max_num_seqs_bounds_the_running_set():
    s = make_scheduler(max_num_seqs=2, budget=100)
    for rid in "abc":
        s.add_request(req(rid, 3))
    assert [r for r, *_ in plan(run_step(s))] == ["a", "b"]
    assert len(s.running) == 2 and [r.request_id for r in s.waiting] == ["c"]


def test_preemption_frees_the_latest_request_and_requeues_it_first():
    # 6 blocks of 4 tokens: a and b take 3 blocks each, then a's decode needs a 4th block
    s = make_scheduler(num_blocks=6, budget=100)
    s.add_request(req("a", 12, max_tokens=8))
    s.add_request(req("b", 12, max_tokens=8))
    s.add_request(req("c", 2))
    assert plan(run_step(s)) == [("a", 0, 12, True), ("b", 0, 12, True)]
    batch = run_step(s)
    assert plan(batch) == [("a", 12, 1, True)]
    assert [r.request_id for r in batch.preempted] == ["b"]
    b = s.requests["b"]
    assert b.status == RequestStatus.WAITING and b.num_computed_tokens == 0 and b.num_preemptions == 1
    assert b.block_table == [] and b.state_slot is None
    # b keeps its generated token and must recompute it together with its prompt; it is ahead of c
    assert b.num_tokens == 13 and [r.request_id for r in s.waiting] == ["b", "c"]
    assert s.blocks.num_free_blocks == 2 and s.slots.num_free_slots == 3


def test_a_request_preempts_itself_when_it_is_the_latest():
    s = make_scheduler(num_blocks=4, budget=100)
    s.add_request(req("a", 8, max_tokens=8))
    s.add_request(req("b", 8, max_tokens=8))
    run_step(s)
    s.requests["a"].token_ids.extend([5, 5, 5, 5])  # a now needs a third block; b is the latest
    batch = run_step(s)
    assert [r.request_id for r in batch.preempted] == ["b"]
    assert plan(batch) == [("a", 8, 5, True)]


def test_abort_waiting_and_running_returns_everything():
    s = make_scheduler(max_num_seqs=1)
    s.add_request(req("a", 9))
    s.add_request(req("b", 3))
    run_step(s)
    assert s.blocks.num_used_blocks == 3 and s.slots.num_used_slots == 1
    assert s.abort("b").status == RequestStatus.FINISHED_ABORTED
    assert s.abort("a").status == RequestStatus.FINISHED_ABORTED
    assert s.abort("a") is None and s.abort("zzz") is None
    assert not s.has_unfinished() and s.blocks.num_free_blocks == 64 and s.slots.num_free_slots == 1


def test_blocks_and_slot_mapping():
    bm = BlockManager(8, 4)
    r = req("a", 1)
    bm.allocate(r, 6)
    assert len(r.block_table) == 2 and bm.num_free_blocks == 6
    assert bm.can_allocate(r, 8) and bm.num_new_blocks(r, 8) == 0
    assert not bm.can_allocate(r, 4 * 9)
    assert bm.slot_mapping(r, 3, 6) == token_slots(r.block_table, 4, 3, 6)
    b0, b1 = r.block_table
    assert bm.slot_mapping(r, 3, 6) == [b0 * 4 + 3, b1 * 4, b1 * 4 + 1]
    bm.free(r)
    assert r.block_table == [] and bm.num_free_blocks == 8
    slots = StateSlots(2)
    r2, r3 = req("b", 1), req("c", 1)
    assert {slots.allocate(r2), slots.allocate(r3)} == {0, 1}
    slots.free(r2)
    slots.free(r2)
    assert slots.num_free_slots == 1 and r2.state_slot is None


@pytest.mark.parametrize(
    ("params", "outputs", "expected", "stop_reason"),
    [
        ({}, [5], None, None),
        ({}, [5, 0], RequestStatus.FINISHED_STOPPED, None),
        ({"ignore_eos": True}, [5, 0], None, None),
        ({"min_tokens": 3}, [5, 0], None, None),
        ({"min_tokens": 2}, [5, 0], RequestStatus.FINISHED_STOPPED, None),
        ({"stop_token_ids": (9,)}, [9], RequestStatus.FINISHED_STOPPED, 9),
        ({"max_tokens": 2}, [5, 6], RequestStatus.FINISHED_LENGTH, None),
        ({"max_tokens": None}, [5] * 5, RequestStatus.FINISHED_LENGTH, None),
    ],
)
def test_stop_rules(params, outputs, expected, stop_reason):
    r = req("a", 3, **params)
    r.token_ids.extend(outputs)
    assert check_stop(r, (0,), max_model_len=8) == expected
    assert r.stop_reason == stop_reason

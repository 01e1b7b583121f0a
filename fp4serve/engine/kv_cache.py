"""Bookkeeping of the two cache kinds of the hybrid model: paged KV blocks and fixed DeltaNet state slots.

Full-attention layers keep K/V for every past token, so their cache is paged (vLLM): a pool of `num_blocks`
blocks of `block_size` token slots, handed out from a free list; a request's block table lists its blocks in token
order and token `p` lives in slot `block_table[p // block_size] * block_size + p % block_size`. Gated DeltaNet
layers keep a fixed-size state per sequence whatever its length, so each running request holds exactly one state
slot (the same index in every DeltaNet layer), never paged. Prefix sharing is off: DeltaNet state could only be
reused at saved snapshots. Both managers deal in integers only; the tensors live in the runner's `ModelCache`.
"""

from __future__ import annotations

from collections import deque

from fp4serve.engine.request import Request


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def token_slots(block_table: list[int], block_size: int, start: int, end: int) -> list[int]:
    """Cache slots of tokens `start .. end-1` of a sequence with this block table (its slot mapping)."""
    return [block_table[p // block_size] * block_size + p % block_size for p in range(start, end)]


class BlockManager:
    """Free list of KV blocks; grows and frees the block tables kept on the requests."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def num_new_blocks(self, request: Request, num_tokens: int) -> int:
        """Blocks the request still needs so that its first `num_tokens` tokens have a slot."""
        return max(0, blocks_needed(num_tokens, self.block_size) - len(request.block_table))

    def can_allocate(self, request: Request, num_tokens: int) -> bool:
        return self.num_new_blocks(request, num_tokens) <= len(self._free)

    def allocate(self, request: Request, num_tokens: int) -> None:
        """Grow the request's block table to cover `num_tokens` tokens (call `can_allocate` first)."""
        need = self.num_new_blocks(request, num_tokens)
        assert need <= len(self._free), "allocate without can_allocate"
        request.block_table.extend(self._free.popleft() for _ in range(need))

    def free(self, request: Request) -> None:
        # freed blocks go to the front so that a hot block is reused first
        self._free.extendleft(reversed(request.block_table))
        request.block_table = []

    def slot_mapping(self, request: Request, start: int, end: int) -> list[int]:
        """Cache slots of the request's tokens `start .. end-1`."""
        return token_slots(request.block_table, self.block_size, start, end)


class StateSlots:
    """One DeltaNet state slot per running request, from a fixed pool of `num_slots`."""

    def __init__(self, num_slots: int) -> None:
        assert num_slots > 0
        self.num_slots = num_slots
        self._free: deque[int] = deque(range(num_slots))

    @property
    def num_free_slots(self) -> int:
        return len(self._free)

    @property
    def num_used_slots(self) -> int:
        return self.num_slots - len(self._free)

    def allocate(self, request: Request) -> int:
        assert request.state_slot is None, f"request {request.request_id} already holds slot {request.state_slot}"
        assert self._free, "no free state slot: the scheduler must keep running requests <= num_slots"
        request.state_slot = self._free.popleft()
        return request.state_slot

    def free(self, request: Request) -> None:
        if request.state_slot is not None:
            self._free.appendleft(request.state_slot)
            request.state_slot = None

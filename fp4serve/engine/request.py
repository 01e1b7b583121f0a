"""Per-request state the scheduler moves between its queues, and the token-level stop rules.

A `Request` is plain Python (no tensors), so the scheduler stays GPU-free and unit-testable. Its token list is the
prompt followed by the generated tokens; `num_computed_tokens` says how many of them are in the caches. That one
counter makes prefill, chunked prefill, decode and recompute after preemption the same thing: the scheduler only
ever asks "how many of the not-yet-computed tokens run this step". The request also holds its KV block table and
its DeltaNet state slot, owned by the `BlockManager` and `StateSlots` that fill them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fp4serve.sampling.stopping import check_stop_token

if TYPE_CHECKING:
    from fp4serve.sampling import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_index: int = 0
    # prompt then generated tokens; the tail beyond num_computed_tokens is what still has to run through the model
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    state_slot: int | None = None
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    # multimodal prompt (fp4serve.model.multimodal.MultimodalPrompt): media to encode and the MRoPE positions of
    # every token, through `positions_for(start, end)`; None for text, whose positions are the token indices
    mm_inputs: Any = None

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.is_finished else None

    def append_output(self, token_id: int) -> None:
        self.token_ids.append(token_id)


def check_stop(request: Request, eos_token_ids: tuple[int, ...], max_model_len: int) -> RequestStatus | None:
    """The finish status after the request's newest token, or None to keep going (sets `request.stop_reason`).

    A full context ends the request first ("length"); then the sampling module's token rules (max_tokens, eos
    unless `ignore_eos`, stop token ids, all gated by `min_tokens`). Stop strings need text, so the engine checks
    them after detokenizing.
    """
    if request.num_tokens >= max_model_len:
        return RequestStatus.FINISHED_LENGTH
    result = check_stop_token(request.params, request.token_ids[-1], request.num_output_tokens, eos_token_ids)
    if result is None:
        return None
    reason, request.stop_reason = result
    return RequestStatus.FINISHED_STOPPED if reason == "stop" else RequestStatus.FINISHED_LENGTH

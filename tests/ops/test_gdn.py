"""Gated delta rule: chunked prefill form and batched decode step against the per-token recurrence in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fp4serve.ops.gdn import (
    chunk_gated_delta_rule,
    gated_delta_rule_recurrent_ref,
    recurrent_gated_delta_rule,
)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make_inputs(lens: list[int], hk: int, hv: int, dk: int, dv: int, seed: int = 0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    n = sum(lens)
    q = F.normalize(torch.randn(n, hk, dk, generator=gen, dtype=torch.float64), dim=-1)
    k = F.normalize(torch.randn(n, hk, dk, generator=gen, dtype=torch.float64), dim=-1)
    v = torch.randn(n, hv, dv, generator=gen, dtype=torch.float64)
    # log-decays spread from almost none to strong, gates over (0, 1)
    g = -F.softplus(torch.randn(n, hv, generator=gen, dtype=torch.float64) * 2 - 2)
    beta = torch.rand(n, hv, generator=gen, dtype=torch.float64)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    return [t.to(dtype) for t in (q, k, v)] + [g.float(), beta.float(), cu]


@pytest.mark.parametrize("lens", [[1], [63], [1000], [63, 1, 130]], ids=lambda x: "lens" + "-".join(map(str, x)))
@pytest.mark.parametrize("dims", [(2, 4, 20, 24), (1, 1, 64, 64)], ids=["hk2hv4-k20v24", "hk1hv1-k64v64"])
def test_chunk(lens: list[int], dims: tuple[int, int, int, int]) -> None:
    hk, hv, dk, dv = dims
    q, k, v, g, beta, cu = make_inputs(lens, hk, hv, dk, dv)
    num_seqs = len(lens)
    slots = torch.arange(num_seqs, dtype=torch.int64).flip(0) + 1  # slot 0 stays unused
    # every other sequence continues from a random state; the rest start from zero (whatever the slot holds)
    has_init = torch.tensor([i % 2 == 1 for i in range(num_seqs)])
    state0 = torch.randn(num_seqs + 1, hv, dk, dv, dtype=torch.float64) * 0.5
    ref_state = state0.clone()
    ref = gated_delta_rule_recurrent_ref(
        q.double(), k.double(), v.double(), g.double(), beta.double(), ref_state, cu, slots, has_init, dk**-0.5
    )
    state = state0.float()
    out = chunk_gated_delta_rule(q, k, v, g, beta, state, cu, slots, has_init, dk**-0.5)
    assert out.dtype == v.dtype and out.shape == v.shape
    assert rel_err(out, ref) < 5e-6
    assert rel_err(state[slots], ref_state[slots]) < 5e-6
    assert torch.equal(state[0], state0[0].float())


def test_chunk_split_prefill_matches_one_shot() -> None:
    """A sequence run in two prefill chunks (state carried in the slot) equals one pass over it."""
    q, k, v, g, beta, _ = make_inputs([200], 2, 4, 20, 24, seed=1, dtype=torch.float64)
    g, beta = g.double(), beta.double()
    slot, yes, no = torch.tensor([0]), torch.tensor([True]), torch.tensor([False])
    one_state = torch.zeros(1, 4, 20, 24, dtype=torch.float64)
    one = chunk_gated_delta_rule(q, k, v, g, beta, one_state, torch.tensor([0, 200]), slot, no, 0.2)
    split_state = torch.full_like(one_state, 7.0)  # garbage: must be ignored when has_initial_state is False
    first = chunk_gated_delta_rule(
        q[:77], k[:77], v[:77], g[:77], beta[:77], split_state, torch.tensor([0, 77]), slot, no, 0.2
    )
    second = chunk_gated_delta_rule(
        q[77:], k[77:], v[77:], g[77:], beta[77:], split_state, torch.tensor([0, 123]), slot, yes, 0.2
    )
    assert rel_err(torch.cat((first, second)), one) < 1e-12
    assert rel_err(split_state, one_state) < 1e-12


def test_decode_step_matches_recurrence() -> None:
    """Batched one-token steps (mixed has_initial_state) chained 20 times equal the per-token loop."""
    b, hk, hv, dk, dv, steps = 3, 2, 6, 36, 20, 20
    q, k, v, g, beta, _ = make_inputs([b * steps], hk, hv, dk, dv, seed=2)
    q, k, v = (t.view(steps, b, *t.shape[1:]) for t in (q, k, v))
    g, beta = g.view(steps, b, hv), beta.view(steps, b, hv)
    slots = torch.tensor([2, 0, 3])
    state0 = torch.randn(4, hv, dk, dv)
    has_init = torch.tensor([True, False, True])
    state = state0.clone()
    outs = [
        recurrent_gated_delta_rule(
            q[t],
            k[t],
            v[t],
            g[t],
            beta[t],
            state,
            slots,
            has_init if t == 0 else torch.ones(b, dtype=torch.bool),
            dk**-0.5,
        )
        for t in range(steps)
    ]
    out = torch.stack(outs, dim=1).reshape(b * steps, hv, dv)  # sequence-major
    ref_state = state0.double()
    seq_major = [x.transpose(0, 1).reshape(b * steps, *x.shape[2:]).double() for x in (q, k, v, g, beta)]
    cu = torch.arange(0, b * steps + 1, steps)
    ref = gated_delta_rule_recurrent_ref(*seq_major, ref_state, cu, slots, has_init, dk**-0.5)
    assert rel_err(out, ref) < 1e-5
    assert rel_err(state[slots], ref_state[slots]) < 1e-5
    assert torch.equal(state[1], state0[1])

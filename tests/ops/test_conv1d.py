"""Causal depthwise conv1d over varlen sequences with conv state, against a per-token float64 loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fp4serve.ops.conv1d import causal_conv1d, causal_conv1d_update


def naive_conv(stream: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """stream [W-1+L, C] (state then new inputs), weight [C, W] → silu(conv) [L, C], one output at a time."""
    width = weight.shape[1]
    rows = [(stream[t : t + width].t() * weight).sum(dim=1) for t in range(stream.shape[0] - width + 1)]
    return F.silu(torch.stack(rows))


@pytest.mark.parametrize("lens", [[1], [63], [1000], [2, 63, 1, 130]], ids=lambda x: "lens" + "-".join(map(str, x)))
@pytest.mark.parametrize("width", [4, 2])
def test_causal_conv1d(lens: list[int], width: int) -> None:
    gen = torch.Generator().manual_seed(0)
    channels, num_seqs = 40, len(lens)
    x = torch.randn(sum(lens), channels, generator=gen)
    weight = torch.randn(channels, width, generator=gen)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    slots = torch.arange(num_seqs) * 2  # scattered slots
    has_init = torch.tensor([i % 2 == 1 for i in range(num_seqs)])
    state0 = torch.randn(2 * num_seqs, channels, width - 1, generator=gen)
    state = state0.clone()
    y = causal_conv1d(x, weight, state, cu, slots, has_init)
    for i in range(num_seqs):
        init = state0[slots[i]].t() if has_init[i] else torch.zeros(width - 1, channels)
        stream = torch.cat((init, x[cu[i] : cu[i + 1]])).double()
        torch.testing.assert_close(
            y[cu[i] : cu[i + 1]].double(), naive_conv(stream, weight.double()), rtol=1e-5, atol=1e-5
        )
        torch.testing.assert_close(state[slots[i]], stream[-(width - 1) :].t().float())
    # untouched slots keep their contents
    torch.testing.assert_close(state[1::2], state0[1::2])


def test_update_chain_matches_varlen() -> None:
    """Prefill 5 tokens, then 20 single-token updates, equals one varlen pass over all 25 tokens."""
    gen = torch.Generator().manual_seed(1)
    channels, width, b = 24, 4, 3
    x = torch.randn(b, 25, channels, generator=gen, dtype=torch.float64)
    weight = torch.randn(channels, width, generator=gen, dtype=torch.float64)
    slots, no = torch.tensor([1, 2, 0]), torch.zeros(b, dtype=torch.bool)
    full_state = torch.zeros(3, channels, width - 1, dtype=torch.float64)
    full = causal_conv1d(x.reshape(-1, channels), weight, full_state, torch.arange(0, 76, 25), slots, no)
    state = torch.randn(3, channels, width - 1, dtype=torch.float64)
    first = causal_conv1d(x[:, :5].reshape(-1, channels), weight, state, torch.arange(0, 16, 5), slots, no)
    steps = [causal_conv1d_update(x[:, t], weight, state, slots, ~no) for t in range(5, 25)]
    chained = torch.cat((first.view(b, 5, channels), torch.stack(steps, dim=1)), dim=1)
    torch.testing.assert_close(chained.reshape(-1, channels), full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, full_state)


def test_update_without_initial_state_starts_from_zero() -> None:
    x, weight = torch.randn(2, 8), torch.randn(8, 4)
    state = torch.randn(2, 8, 3)
    y = causal_conv1d_update(x, weight, state, torch.tensor([0, 1]), torch.tensor([False, True]))
    torch.testing.assert_close(y[0], F.silu(x[0] * weight[:, 3]))
    assert torch.equal(state[0, :, 2], x[0]) and torch.equal(state[0, :, :2], torch.zeros(8, 2))

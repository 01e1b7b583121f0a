"""Partial interleaved MRoPE against a per-frequency float64 loop written from the spec."""

from __future__ import annotations

import math

import pytest
import torch

from fp4serve.ops.rope import apply_mrope, mrope_axis_of_frequency, mrope_cos_sin


def test_axis_assignment_27b_section() -> None:
    axis = mrope_axis_of_frequency(32, (11, 11, 10))
    assert axis.tolist() == [j % 3 for j in range(32)]
    assert [int((axis == a).sum()) for a in range(3)] == [11, 11, 10]


def test_axis_assignment_short_section_falls_back_to_t() -> None:
    # frequencies past 3 * section[axis] take the T row
    assert mrope_axis_of_frequency(8, (2, 2, 1)).tolist() == [0, 1, 2, 0, 1, 0, 0, 0]


@pytest.mark.parametrize(
    "head_dim,rotary_dim,section", [(24, 6, (1, 1, 1)), (256, 64, (11, 11, 10)), (72, 18, (3, 3, 3))]
)
def test_apply_mrope(head_dim: int, rotary_dim: int, section: tuple[int, int, int]) -> None:
    gen = torch.Generator().manual_seed(0)
    n, heads, kv_heads, theta = 63, 4, 2, 1e7
    positions = torch.randint(0, 5000, (3, n), generator=gen)  # distinct T, H, W rows
    q = torch.randn(n, heads, head_dim, generator=gen)
    k = torch.randn(n, kv_heads, head_dim, generator=gen)
    cos, sin = mrope_cos_sin(positions, rotary_dim, theta, section)
    q_out, k_out = apply_mrope(q, k, cos, sin)
    half = rotary_dim // 2
    axis = mrope_axis_of_frequency(half, section)
    for x, out in ((q, q_out), (k, k_out)):
        ref = x.double().clone()
        for j in range(half):
            angle = positions[axis[j]].double() * theta ** (-2 * j / rotary_dim)
            c, s = torch.cos(angle)[:, None], torch.sin(angle)[:, None]
            ref[..., j] = x[..., j].double() * c - x[..., j + half].double() * s
            ref[..., j + half] = x[..., j + half].double() * c + x[..., j].double() * s
        # angles up to 5000 rad in float32 carry ~2e-4 absolute phase error
        torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-3)
        assert torch.equal(out[..., rotary_dim:], x[..., rotary_dim:])
    assert math.isclose(float(q_out.norm()), float(q.norm()), rel_tol=1e-5)

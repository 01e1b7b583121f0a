"""Op tests run with `torch.empty` / `torch.empty_like` poisoned with NaN, so an output row an op forgets to write
shows up as a failure instead of passing by luck with zeroed memory."""

from __future__ import annotations

import pytest
import torch

_empty = torch.empty
_empty_like = torch.empty_like


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point():
        t.fill_(float("nan"))
    return t


@pytest.fixture(autouse=True)
def nan_poisoned_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "empty", lambda *a, **k: _poison(_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _poison(_empty_like(*a, **k)))

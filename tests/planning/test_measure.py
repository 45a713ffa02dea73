"""saved_activation_bytes counts what the graph holds when forward ends: analytic cases."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from lightning_zenft.planning.measure import saved_activation_bytes

N = 1000


class ExpSum(nn.Module):
    """``loss = sum(exp(w))``: backward keeps exactly ``exp(w)`` (N fp32 values); ``sum`` keeps nothing."""

    def __init__(self, scratch: bool = False, view: bool = False) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(-1, 1, N))
        self.scratch, self.view = scratch, view

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> SimpleNamespace:
        if self.scratch:  # a graph built and dropped inside forward: 4 N bytes saved, then freed
            dropped = (self.w * 3).exp().sum()
            del dropped
        held = self.w.exp()
        loss = held.sum()
        if self.view:  # sin of a view keeps the view: the same storage as `held`, counted once
            loss = loss + held[: N // 2].sin().sum()
        return SimpleNamespace(loss=loss)


def test_counts_the_held_tensor_once_and_no_parameter():
    ids = torch.zeros(1, 1, dtype=torch.long)
    loss, saved = saved_activation_bytes(ExpSum(), ids)
    assert saved == 4 * N
    loss.backward()
    _, saved_with_view = saved_activation_bytes(ExpSum(view=True), ids)
    assert saved_with_view == 4 * N


def test_a_graph_dropped_inside_forward_is_not_counted():
    loss, saved = saved_activation_bytes(ExpSum(scratch=True), torch.zeros(1, 1, dtype=torch.long))
    assert saved == 4 * N
    loss.backward()  # the held graph still runs backward through the handles
    assert torch.allclose(ExpSum().w.exp(), ExpSum(scratch=True).w.exp())

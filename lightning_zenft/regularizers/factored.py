r"""The rank-1 factored Fisher of an adapted layer's effective weight, from per-unit output gradients and inputs.

With :math:`\Delta` the gradient at a linear layer's output and :math:`X` its input (tokens by features), one unit's
weight gradient is :math:`G = \Delta^\top X`; the row and column sums of :math:`G \odot G` come from ``T x T`` Gram
matrices without forming ``G`` (see :mod:`lightning_zenft.regularizers.fisher`). The factored Fisher
``F_ij ~ row_i col_j`` is the rank-1 matrix with the same row and column sums.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn


def add_rank1(
    old: tuple[torch.Tensor, torch.Tensor], new: tuple[torch.Tensor, torch.Tensor], decay: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-1 fit (same row and column sums) of ``decay * old + new``, both rank-1, without forming either."""
    (r0, c0), (r1, c1) = old, new
    s0, s1 = c0.sum(), c1.sum()
    row = decay * r0 * s0 + r1 * s1  # (out,) row sums of the sum
    col = decay * c0 * r0.sum() + c1 * r1.sum()  # (in,) column sums
    total = row.sum()
    if total <= 0:
        return torch.zeros_like(r0), torch.zeros_like(c0)
    return row, col / total


def add_factor_sums(
    name: str,
    delta: torch.Tensor,
    x: torch.Tensor,
    rows: dict[str, torch.Tensor],
    cols: dict[str, torch.Tensor],
    weight: float,
) -> None:
    """Add the row and column sums of ``(delta_k^T x)^2`` over units ``k`` without forming ``delta_k^T x``."""
    delta = delta.float()  # (K, T, out)
    x = x.float()  # (T, in)
    gram_x = x @ x.T  # (T, T)
    row = (torch.einsum("kts,ksi->kti", gram_x.expand(delta.shape[0], -1, -1), delta) * delta).sum((0, 1))  # (out,)
    gram_d = delta @ delta.transpose(1, 2)  # (K, T, T)
    col = (torch.einsum("kts,sj->ktj", gram_d, x) * x).sum((0, 1))  # (in,)
    rows[name] = rows[name] + weight * row if name in rows else weight * row
    cols[name] = cols[name] + weight * col if name in cols else weight * col


class Capture:
    """Forward hooks that keep each factored layer's inputs (detached) and outputs (in the graph) for one example."""

    def __init__(self, layers: Mapping[str, nn.Module], keep_grads: bool) -> None:
        self.layers = dict(layers)
        self.keep_grads = keep_grads
        self._x: dict[str, list[torch.Tensor]] = {n: [] for n in self.layers}
        self._y: dict[str, list[torch.Tensor]] = {n: [] for n in self.layers}
        self._g: dict[str, list[torch.Tensor]] = {n: [] for n in self.layers}
        self._handles: list[Any] = []

    def __enter__(self) -> Capture:
        self.clear()
        if not self._handles:
            for name, module in self.layers.items():
                self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not args or not isinstance(args[0], torch.Tensor) or not isinstance(output, torch.Tensor):
                raise TypeError(
                    f"layer {name!r} ({type(module).__name__}) must take a tensor first and return a tensor for its "
                    "factored Fisher; leave it out of `factored` (its own parameters then get a dense Fisher)."
                )
            if not output.requires_grad:
                output.requires_grad_(True)  # a frozen layer fed by frozen layers: still a point to take gradients at
            x = args[0].detach()
            self._x[name].append(x.reshape(-1, x.shape[-1]))
            self._y[name].append(output)
            if self.keep_grads:
                output.register_hook(lambda g: self._g[name].append(g))

        return hook

    def outputs(self) -> list[tuple[str, list[torch.Tensor]]]:
        return [(n, self._y[n]) for n in self.layers]

    def inputs(self, name: str) -> torch.Tensor:
        return torch.cat(self._x[name], dim=0)  # (T, in)

    def grads(self, name: str) -> list[torch.Tensor]:
        if len(self._g[name]) != len(self._y[name]):
            return [torch.zeros_like(y) for y in self._y[name]]  # no gradient reached the layer in this unit
        return self._g[name]

    def reset_grads(self) -> None:
        for g in self._g.values():
            g.clear()

    def numel(self) -> int:
        return sum(y.numel() for ys in self._y.values() for y in ys)

    def clear(self) -> None:
        for d in (self._x, self._y, self._g):
            for v in d.values():
                v.clear()

    def remove(self) -> None:
        self.__exit__()
        self.clear()


__all__ = ["Capture", "add_factor_sums", "add_rank1"]

"""What a weight penalty acts on in a model: dense trainable tensors, low-rank adapters, other mergeable adapters.

Adapters are found through the protocols of :mod:`lightning_zenft.adapters` (never by class or parameter name):

* a :class:`~lightning_zenft.adapters.LowRankUpdate` adapter (LoRA) is penalized on its effective weight change
  ``s (B A - B0 A0)`` of the frozen base weight, from its factors (:func:`~.penalties.lowrank_penalty`);
* another :class:`~lightning_zenft.adapters.Mergeable` adapter (DoRA) on its effective weight change, formed a few
  columns at a time by running the layer on unit vectors (:func:`effective_weight_columns`): a mergeable layer is a
  linear map, so ``layer(e_j) - layer(0)`` is column ``j`` of its effective weight, and autograd gives the gradient
  the layer's own backward defines (DoRA's detached norm included);
* any other adapter (prefix tuning, bottleneck) on its own parameters, like every other trainable tensor (full
  fine-tuning weights, trained biases and norms, ``modules_to_save``).

Example:
    >>> from torch import nn
    >>> from lightning_zenft import LoRALinear
    >>> model = nn.Sequential(LoRALinear(nn.Linear(8, 8), r=2, alpha=4), nn.Linear(8, 2))
    >>> t = find_targets(model)
    >>> sorted(t.dense), sorted(t.lowrank)
    (['1.bias', '1.weight'], ['0'])
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call

from lightning_zenft.adapters import Mergeable, find_adapters


@dataclass
class Targets:
    """The parts of a model a weight penalty acts on.

    Attributes:
        dense: qualified name -> trainable parameter, penalized entry by entry.
        lowrank: qualified name -> low-rank adapter layer (``low_rank_factors()``).
        mergeable: qualified name -> mergeable, not low-rank adapter layer (penalized on ``merged_weight`` changes).
    """

    dense: dict[str, nn.Parameter] = field(default_factory=dict)
    lowrank: dict[str, nn.Module] = field(default_factory=dict)
    mergeable: dict[str, nn.Module] = field(default_factory=dict)

    @property
    def factored(self) -> dict[str, nn.Module]:
        """The adapter layers whose base weight gets a factored Fisher: low-rank and mergeable ones."""
        return {**self.lowrank, **self.mergeable}

    def names(self) -> list[str]:
        return sorted(self.dense) + sorted(self.lowrank) + sorted(self.mergeable)


def is_low_rank(layer: nn.Module) -> bool:
    """True for adapters that satisfy ``LowRankUpdate`` (``low_rank_factors`` callable; DoRA sets it to None)."""
    return callable(getattr(layer, "low_rank_factors", None))


def adapter_parameters(layer: nn.Module) -> dict[str, nn.Parameter]:
    """An adapter layer's own parameters (``adapter_params()``), by relative name."""
    params = dict(layer.named_parameters())
    return {n: params[n] for n in layer.adapter_params()}  # type: ignore[operator]


def find_targets(model: nn.Module) -> Targets:
    """Sort the trainable parts of ``model`` into dense tensors, low-rank adapters and mergeable adapters."""
    targets = Targets()
    covered: set[int] = set()
    for name, layer in find_adapters(model):
        own = adapter_parameters(layer)  # type: ignore[arg-type]
        if not any(p.requires_grad for p in own.values()):
            continue
        if is_low_rank(layer):
            targets.lowrank[name] = layer  # type: ignore[assignment]
        elif isinstance(layer, Mergeable):
            targets.mergeable[name] = layer  # type: ignore[assignment]
        else:
            continue  # its parameters are penalized like any other trainable tensor
        covered.update(id(p) for p in own.values())
    for name, param in model.named_parameters():
        if param.requires_grad and id(param) not in covered:
            targets.dense[name] = param
    return targets


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.train(mode)


def effective_weight_columns(
    layer: nn.Module, columns: torch.Tensor, overrides: Mapping[str, torch.Tensor] | None = None
) -> torch.Tensor:
    """Columns ``columns`` of a linear layer's effective ``(out, in)`` weight, as ``(len(columns), out)``.

    Runs ``layer`` (in eval mode, so without dropout) on the unit vectors ``e_j`` and on zero:
    ``layer(e_j) - layer(0)`` is column ``j``. ``overrides`` replaces parameters by relative name (the anchor's
    values), through ``torch.func.functional_call``. Differentiable in the layer's parameters.
    """
    params = dict(layer.named_parameters())
    dtype = next(iter(adapter_parameters(layer).values())).dtype
    n_in = int(getattr(layer, "in_features"))  # noqa: B009
    device = next(iter(params.values())).device
    basis = torch.zeros(len(columns) + 1, n_in, device=device, dtype=dtype)  # (c + 1, in): e_j rows, then zero
    basis[torch.arange(len(columns), device=device), columns.to(device)] = 1
    with _eval_mode(layer):
        out = layer(basis) if overrides is None else functional_call(layer, dict(overrides), (basis,))  # (c + 1, out)
    return (out[:-1] - out[-1:]).float()  # (c, out)


__all__ = ["Targets", "adapter_parameters", "effective_weight_columns", "find_targets", "is_low_rank"]

"""Fused kernels on FSDP2-sharded models: when a layer's parameters are whole, and how to make them whole.

Under FSDP2 (``fully_shard``) a layer's registered parameters are ``DTensor`` shards between forwards, but the unit's
pre-forward hook all-gathers them and registers ordinary tensors for the duration of the forward and backward: what
the fused kernels see at run time is whole, so a layer inside an FSDP2 unit can be fused like any other. Checks run
at fuse time (the MLP probes, which call a module's forward outside the unit's own forward) gather the unit
explicitly with :func:`unsharded`. Parameters that are still ``DTensor`` during a forward (tensor parallelism, or a
layer outside every FSDP2 unit) are refused: the fused layer then runs its plain forward and says so once.

Example::

    units = fsdp_units(model)                 # id(module) -> the FSDP2 unit whose forward gathers its parameters
    with unsharded(units.get(id(mlp))):
        mlp(probe)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


def is_dtensor(tensor: object) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (checked by name: no distributed import needed)."""
    return type(tensor).__name__ == "DTensor"


def fsdp_units(model: nn.Module) -> dict[int, nn.Module]:
    """``id(module) -> unit`` for every module of ``model`` inside an FSDP2 unit (the nearest one, itself included)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch built without distributed support
        return {}
    found: dict[int, nn.Module] = {}

    def visit(module: nn.Module, unit: nn.Module | None) -> None:
        if isinstance(module, FSDPModule):
            unit = module
        if unit is not None:
            found[id(module)] = unit
        for child in module.children():
            visit(child, unit)

    visit(model, None)
    return found


@contextmanager
def unsharded(unit: nn.Module | None) -> Iterator[None]:
    """All-gather an FSDP2 unit's parameters for the block (collective: every rank must enter); no-op for None."""
    if unit is None:
        yield
        return
    unit.unshard()  # type: ignore[operator]
    try:
        yield
    finally:
        unit.reshard()  # type: ignore[operator]


def sharded_at_run_time(layer: nn.Module) -> bool:
    """Whether any parameter of ``layer`` is a ``DTensor`` right now (inside a forward: not gathered by FSDP2)."""
    return any(is_dtensor(p) for p in layer.parameters())


__all__ = ["fsdp_units", "is_dtensor", "sharded_at_run_time", "unsharded"]

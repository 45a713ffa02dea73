"""Whole trained tensors on rank 0 from a sharded model, for exports such as ``save_adapter``.

Under FSDP2 every parameter is a ``DTensor`` holding this rank's shard; under FSDP1 parameters live in flat shards
and wrapper modules (``_fsdp_wrapped_module``, ``_checkpoint_wrapped_module``) sit between a module and its children.
:func:`gathered_for_export` gives rank 0, for the duration of a ``with`` block, a model whose trained parameters are
whole ordinary tensors under their ordinary names, so code written for one process (PEFT-format export) runs
unchanged. Only trained parameters are gathered (adapters are megabytes): frozen ones stay sharded. Every rank must
enter the block (the gathers are collective); only rank 0 gets whole tensors.

Example::

    with gathered_for_export(pl_module, rank_zero=trainer.is_global_zero):
        if trainer.is_global_zero:
            save_adapter(pl_module.model, "out/adapter")
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from torch import nn

_WRAPPED = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def is_sharded(model: nn.Module) -> bool:
    """True when ``model`` holds FSDP2 ``DTensor`` parameters or FSDP1 units."""
    return any(_is_dtensor(p) for p in model.parameters()) or bool(_fsdp1_units(model))


@contextmanager
def gathered_for_export(model: nn.Module, rank_zero: bool, root: nn.Module | None = None) -> Iterator[None]:
    """Within the block, on rank 0, ``model``'s trained parameters are whole tensors under unwrapped names (see the
    module docstring); nothing changes on other ranks or for a model that is not sharded.

    ``root``: the module the strategy wraps (``trainer.strategy.model``), when FSDP1 wraps ``model`` from outside.
    """
    with ExitStack() as stack:
        units = _fsdp1_units(root if root is not None else model)
        if units:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            for unit in units:
                flat = getattr(unit, "_flat_param", None)
                if flat is not None and flat.requires_grad:
                    stack.enter_context(FSDP.summon_full_params(unit, recurse=False, writeback=False, rank0_only=True))
            if rank_zero:
                stack.enter_context(_unwrapped(model))
        else:
            stack.enter_context(_whole_dtensors(model, rank_zero))
        yield


@contextmanager
def _whole_dtensors(model: nn.Module, rank_zero: bool) -> Iterator[None]:
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None or not param.requires_grad or not _is_dtensor(param):
                continue
            whole = param.full_tensor().detach()  # collective: every rank runs it, in the same order
            if rank_zero:
                swapped.append((module, name, param))
                module._parameters[name] = nn.Parameter(whole, requires_grad=True)
    try:
        yield
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param


@contextmanager
def _unwrapped(model: nn.Module) -> Iterator[None]:
    """Replace wrapper modules by the module they wrap, everywhere below ``model``, for the block's duration."""
    replaced: list[tuple[nn.Module, str, nn.Module]] = []
    stack = [model]
    while stack:
        parent = stack.pop()
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            inner = child
            while any(hasattr(inner, attr) and attr in inner._modules for attr in _WRAPPED):
                inner = next(inner._modules[a] for a in _WRAPPED if a in inner._modules)
            if inner is not child:
                replaced.append((parent, name, child))
                parent._modules[name] = inner
            stack.append(inner)
    try:
        yield
    finally:
        for parent, name, child in reversed(replaced):
            parent._modules[name] = child


def _fsdp1_units(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__ == "FullyShardedDataParallel"]


def _is_dtensor(tensor: object) -> bool:
    return type(tensor).__name__ == "DTensor"


__all__ = ["gathered_for_export", "is_sharded"]

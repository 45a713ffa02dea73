"""What the forgetting monitor does on a drop beyond its limit, apart from warning.

* :func:`save_checkpoint_atomically`: a Lightning checkpoint through the Trainer (every rank takes part, as sharded
  strategies need), written under a temporary name and renamed, so a crash never leaves half a file under the name;
* :func:`strength_callbacks` / :func:`raise_strengths`: forgetting-prevention callbacks in the same Trainer that
  expose ``scale_strength(factor) -> float`` (EWC, L2-SP) have their strength multiplied;
* :class:`Snapshot`: the trainable parameters and the optimizers' state at the last measurement within the limits,
  restored on a rollback. It holds one copy of the trainable parameters and of the optimizer state (with adapters:
  adapter-sized; with full fine-tuning: the whole model and its optimizer state again), on their own devices.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback


def save_checkpoint_atomically(trainer: pl.Trainer, path: str | Path) -> Path:
    """``trainer.save_checkpoint`` to ``path`` through a temporary name (renamed on global rank 0)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    trainer.save_checkpoint(tmp)  # collective; returns after a barrier, the file written by rank 0
    if trainer.is_global_zero:
        os.replace(tmp, path)
    trainer.strategy.barrier("zenft_forgetting_checkpoint")
    return path


def strength_callbacks(trainer: pl.Trainer, exclude: Callback | None = None) -> list[Callback]:
    """The Trainer's callbacks that have a ``scale_strength(factor)`` method."""
    return [cb for cb in trainer.callbacks if cb is not exclude and callable(getattr(cb, "scale_strength", None))]


def raise_strengths(callbacks: list[Callback], factor: float) -> dict[str, float]:
    """Call ``scale_strength(factor)`` on each; returns ``{callback class name (#i if repeated): new strength}``."""
    out: dict[str, float] = {}
    for cb in callbacks:
        name = type(cb).__name__
        key, i = name, 1
        while key in out:
            i += 1
            key = f"{name}#{i}"
        out[key] = float(cb.scale_strength(factor))  # type: ignore[attr-defined]
    return out


class Snapshot:
    """Trainable parameters and optimizer state at one step, to roll back to.

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> snap = Snapshot.take(model, [opt], step=0, lr_scale=1.0)
        >>> with torch.no_grad():
        ...     _ = model.weight.add_(1.0)
        >>> snap.restore(model, [opt], lr_ratio=1.0)
        >>> torch.equal(model.weight, snap.params["weight"])
        True
    """

    def __init__(
        self, step: int, params: dict[str, torch.Tensor], optimizers: list[dict[str, Any]], lr_scale: float
    ) -> None:
        self.step = step
        self.params = params
        self.optimizers = optimizers
        self.lr_scale = lr_scale

    @classmethod
    def take(
        cls, module: torch.nn.Module, optimizers: list[torch.optim.Optimizer], step: int, lr_scale: float
    ) -> Snapshot:
        params = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
        return cls(step, params, [copy.deepcopy(opt.state_dict()) for opt in optimizers], lr_scale)

    def restore(self, module: torch.nn.Module, optimizers: list[torch.optim.Optimizer], lr_ratio: float) -> None:
        """Copy the parameters and optimizer state back; multiply every learning rate by ``lr_ratio``."""
        current = dict(module.named_parameters())
        missing = sorted(set(self.params) - set(current))
        if missing or len(optimizers) != len(self.optimizers):
            raise RuntimeError(
                f"cannot roll back to step {self.step}: the model or its optimizers changed since (missing parameters "
                f"{missing[:3]}, {len(optimizers)} optimizers now against {len(self.optimizers)})."
            )
        with torch.no_grad():
            for name, value in self.params.items():
                current[name].copy_(value)
        for opt, state in zip(optimizers, self.optimizers, strict=True):
            opt.load_state_dict(copy.deepcopy(state))  # deep: load_state_dict may keep the given tensors
            for group in opt.param_groups:
                group["lr"] = group["lr"] * lr_ratio
                if "initial_lr" in group:
                    group["initial_lr"] = group["initial_lr"] * lr_ratio

    def state(self) -> dict[str, Any]:
        return {"step": self.step, "params": self.params, "optimizers": self.optimizers, "lr_scale": self.lr_scale}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Snapshot:
        return cls(int(state["step"]), state["params"], state["optimizers"], float(state["lr_scale"]))


def scale_scheduler_lrs(trainer: pl.Trainer, factor: float) -> None:
    """Multiply the base learning rates of the Trainer's LR schedulers (those that have them) by ``factor``."""
    for config in trainer.lr_scheduler_configs:
        scheduler = config.scheduler
        if hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]


__all__ = ["Snapshot", "raise_strengths", "save_checkpoint_atomically", "scale_scheduler_lrs", "strength_callbacks"]

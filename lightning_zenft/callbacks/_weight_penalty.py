"""The base of the ``EWC`` and ``L2SP`` callbacks: a quadratic pull toward the weights at fit start.

Where the penalty enters: its gradient ``strength * F * (theta - theta*)`` is added to ``.grad`` in
``on_before_optimizer_step``, which Lightning calls once per optimizer step, after the gradients of all accumulated
micro-batches are summed and after AMP unscaling, before gradient clipping. The user's ``training_step`` and loss are
untouched; the penalty's value and its share of the loss (``penalty / (task loss + penalty)``, the task loss summed
over the step's micro-batches as ``on_before_backward`` sees them) are logged as ``<name>/penalty`` and
``<name>/share`` on the steps the loggers take (``log_every_n_steps``, and the first and last step): the value costs
one more pass over the weights, the gradient is added at every step.

What it acts on (:func:`~lightning_zenft.regularizers.find_targets`): every trainable tensor entry by entry; a LoRA
layer through its factors, on the change ``s (B A - B0 A0)`` of its effective weight; other mergeable adapters on
their merged weight's change. Memory: one fp32 anchor per trainable tensor (and the subclass's Fisher); a LoRA layer
that starts at ``B = 0`` needs no anchor at all.

Under FSDP2 (``ModelParallelStrategy``) parameters and gradients are ``DTensor`` shards: anchors, Fisher and the
added gradient are the local shards, and the logged value is summed over ranks. LoRA factors are gathered (they are
small) for the ``r x r`` products and the gradient's local rows are added. DeepSpeed and FSDP1 are refused: DeepSpeed
keeps gradients inside its engine, and FSDP1's flat parameters have no test here (that needs a GPU). Any precision
works: anchors and Fisher are fp32, the penalty's gradient is computed in fp32 and added in the gradient's dtype, and
with fp16 AMP the gradients are already unscaled when the hook runs.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_zenft.regularizers.penalties import lowrank_penalty, weighted_delta_penalty
from lightning_zenft.regularizers.targets import Targets, adapter_parameters, effective_weight_columns, find_targets

_CHECKPOINT_KEY = "zenft_weight_penalties"


def is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "to_local")


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a ``DTensor`` (a plain tensor is its own shard)."""
    return t.to_local() if is_dtensor(t) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a ``DTensor`` is gathered from every rank (a collective: every rank must call it)."""
    return t.full_tensor() if is_dtensor(t) else t


def shard_like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The part of a whole ``value`` (shaped like ``param``) that this rank holds of ``param``."""
    if not is_dtensor(param):
        return value
    from torch.distributed.tensor import distribute_tensor

    placed = distribute_tensor(value.to(local(param).device), param.device_mesh, param.placements, src_data_rank=None)
    return placed.to_local()


def gather_like(shard: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The whole tensor whose local part is ``shard``, laid out as ``param`` (a collective under FSDP)."""
    if not is_dtensor(param):
        return shard
    from torch.distributed.tensor import DTensor

    dt = DTensor.from_local(shard, param.device_mesh, param.placements, shape=param.shape, stride=param.stride())
    return dt.full_tensor()


def check_strength(value: float, owner: str) -> float:
    if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"{owner}: strength={value!r} must be a finite number > 0 (to switch the penalty off, remove the callback)."
        )
    return float(value)


class WeightPenalty(Callback):
    """A quadratic penalty toward the weights at fit start (see the module docstring); subclasses set the weights.

    Args:
        strength: ``lambda`` in ``lambda / 2 * sum F (theta - theta*)^2``.
        name: prefix of the logged metrics and part of ``state_key`` (two instances need two names).
    """

    kind = "penalty"

    def __init__(self, strength: float, name: str | None = None) -> None:
        self._strength = check_strength(strength, type(self).__name__)
        self.name = name or self.kind
        self.task_count = 0
        self.targets: Targets | None = None
        self.anchors: dict[str, torch.Tensor] = {}  # dense targets: local shards, fp32
        self.lowrank_anchors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # (A0, B0) local shards, if B0 != 0
        self.mergeable_anchors: dict[str, dict[str, torch.Tensor]] = {}  # adapter parameters, whole, fp32
        self.last_penalty: torch.Tensor | None = None
        self._restored: dict[str, Any] | None = None
        self._loss_sum: torch.Tensor | None = None
        self._trainer: pl.Trainer | None = None
        self._sharded = False
        self._optimized: dict[int, set[int]] = {}

    # ------------------------------------------------------------------ strength
    @property
    def strength(self) -> float:
        """``lambda``; set it (or call :meth:`scale_strength`) to change the pull during training."""
        return self._strength

    @strength.setter
    def strength(self, value: float) -> None:
        self._strength = check_strength(value, type(self).__name__)

    def scale_strength(self, factor: float) -> float:
        """Multiply the strength by ``factor`` (> 0), log the new value, and return it.

        A forgetting monitor calls this when the general metric drops past its limit.
        """
        if not isinstance(factor, int | float) or not math.isfinite(factor) or factor <= 0:
            raise ValueError(f"{type(self).__name__}.scale_strength(factor={factor!r}): factor must be finite and > 0.")
        self.strength = self._strength * factor
        rank_zero_info(f"{type(self).__name__}({self.name}): strength x{factor:g} -> {self._strength:g}")
        trainer = self._trainer
        if trainer is not None:
            for logger in trainer.loggers:
                logger.log_metrics({f"{self.name}/strength": self._strength}, step=trainer.global_step)
        return self._strength

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    # ------------------------------------------------------------------ set-up
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer
        strategy = type(trainer.strategy).__name__
        if "DeepSpeed" in strategy:
            raise RuntimeError(
                f"{type(self).__name__} cannot serve {strategy}: DeepSpeed keeps (partitioned) gradients inside its "
                "engine, so a gradient added in on_before_optimizer_step never reaches its optimizer. Use "
                "ModelParallelStrategy (FSDP2), DDP or a single device."
            )
        if strategy == "FSDPStrategy":
            raise RuntimeError(
                f"{type(self).__name__} cannot serve FSDPStrategy (FSDP1): its flat-parameter gradients are not "
                "supported here. Use ModelParallelStrategy (FSDP2), whose DTensor shards the penalty handles."
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trainer = trainer
        targets = find_targets(pl_module)
        if not (targets.dense or targets.lowrank or targets.mergeable):
            raise RuntimeError(
                f"{type(self).__name__}: the model has no trainable parameter to hold near its start; add an adapter "
                "callback or unfreeze parameters before fit."
            )
        params = [*targets.dense.values()]
        for layer in targets.factored.values():
            params.extend(adapter_parameters(layer).values())
        self._sharded = any(is_dtensor(p) for p in params)
        if self._sharded and targets.mergeable:
            raise RuntimeError(
                f"{type(self).__name__}: mergeable adapters that are not low-rank ({sorted(targets.mergeable)[:3]}...) "
                "are not supported under a sharded strategy (their effective weight is formed by running the layer, "
                "whose parameters are shards). Use LoRA, or a single device / DDP."
            )
        self.targets = targets
        self._optimized.clear()
        if self._restored is not None:
            self.load_tensor_state(self._restored, pl_module)
            self._restored = None
            return
        self.task_count += 1
        self._capture_anchors()
        self.begin_task(trainer, pl_module)

    def _capture_anchors(self) -> None:
        assert self.targets is not None
        self.anchors = {n: local(p).detach().float().clone() for n, p in self.targets.dense.items()}
        self.lowrank_anchors = {}
        for name, layer in self.targets.lowrank.items():
            a, b, _ = layer.low_rank_factors()  # type: ignore[operator]
            if bool(full(b.detach()).abs().sum() > 0):  # LoRA starts at B = 0: no anchor term
                self.lowrank_anchors[name] = (local(a).detach().float().clone(), local(b).detach().float().clone())
        self.mergeable_anchors = {
            name: {k: v.detach().float().clone() for k, v in adapter_parameters(layer).items()}
            for name, layer in self.targets.mergeable.items()
        }

    def begin_task(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Called at the fit start of each new task, after the anchors are taken (EWC estimates its Fisher here)."""

    def weights(self, name: str) -> torch.Tensor | None:
        """The per-entry weight ``F`` of dense target ``name`` (local shard); ``None`` means ones."""
        return None

    def factors(self, name: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The factored weight ``(row, col)`` of adapter layer ``name``; ``(None, None)`` means ones."""
        return None, None

    # ------------------------------------------------------------------ the step
    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        loss = loss.detach().float()
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.targets is None:
            return
        in_optimizer = self._optimized.get(id(optimizer))
        if in_optimizer is None:
            in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
            self._optimized[id(optimizer)] = in_optimizer
        with_value = _logging_step(trainer)
        sharded, replicated = self._apply(in_optimizer, pl_module.device, with_value)
        if with_value:
            if self._sharded:  # dense shards add up over ranks; LoRA terms are computed whole on every rank
                sharded = trainer.strategy.reduce(sharded, reduce_op="sum")
            penalty = 0.5 * self._strength * (sharded + replicated)
            self.last_penalty = penalty.detach()
            pl_module.log(f"{self.name}/penalty", penalty, on_step=True, on_epoch=False, batch_size=1)
            if self._loss_sum is not None:
                share = penalty / (self._loss_sum + penalty).clamp_min(1e-30)
                pl_module.log(f"{self.name}/share", share, on_step=True, on_epoch=False, batch_size=1)
        self._loss_sum = None

    @torch.no_grad()
    def _apply(
        self, in_optimizer: set[int], device: torch.device, with_value: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the penalty's gradient to ``.grad``; return ``sum F d^2`` over local shards and over whole tensors
        (the dense part only when ``with_value``: it costs one more pass over the weights)."""
        assert self.targets is not None
        strength = self._strength
        total = torch.zeros((), dtype=torch.float32, device=device)
        whole = torch.zeros((), dtype=torch.float32, device=device)
        names = [n for n, p in self.targets.dense.items() if id(p) in in_optimizer]
        for group in _groups(names, self.anchors):
            total += self._apply_dense(group, strength, with_value)
        for name, layer in self.targets.lowrank.items():
            a, b, scale = layer.low_rank_factors()  # type: ignore[operator]
            if id(a) not in in_optimizer and id(b) not in in_optimizer:
                continue
            row, col = self.factors(name)
            anchor = self.lowrank_anchors.get(name)
            a0 = b0 = None
            if anchor is not None:
                a0, b0 = gather_like(anchor[0], a), gather_like(anchor[1], b)
            value, grad_a, grad_b = lowrank_penalty(full(a.detach()), full(b.detach()), scale, row, col, a0, b0)
            whole += 2 * value
            if id(a) in in_optimizer and a.requires_grad:
                _grad_local(a).add_(shard_like(grad_a, a), alpha=strength)
            if id(b) in in_optimizer and b.requires_grad:
                _grad_local(b).add_(shard_like(grad_b, b), alpha=strength)
        for name, layer in self.targets.mergeable.items():
            whole += self._apply_mergeable(name, layer, in_optimizer, strength)
        return total, whole

    def _apply_dense(self, names: list[str], strength: float, with_value: bool) -> torch.Tensor:
        """``grad += strength * F * (theta - theta*)`` for a group of dense targets: two ``torch._foreach`` passes
        (the difference, then a fused multiply-add into the gradients); ``sum F (theta - theta*)^2`` if asked."""
        assert self.targets is not None
        params = [local(self.targets.dense[n]).detach() for n in names]
        diffs = torch._foreach_sub([p.float() for p in params], [self.anchors[n] for n in names])  # fp32 temporaries
        weights = [self.weights(n) for n in names]
        grads = [_grad_local(self.targets.dense[n]) for n in names]
        fp32 = all(g.dtype == torch.float32 for g in grads)
        if weights[0] is None:  # L2-SP
            if fp32:
                torch._foreach_add_(grads, diffs, alpha=strength)
            else:
                for g, d in zip(grads, diffs, strict=True):
                    g.add_(d, alpha=strength)
            if not with_value:
                return torch.zeros((), device=diffs[0].device)
            return torch.stack(torch._foreach_norm(diffs, 2)).square().sum()
        if fp32:
            torch._foreach_addcmul_(grads, diffs, weights, value=strength)  # type: ignore[arg-type]
        else:
            for g, d, w in zip(grads, diffs, weights, strict=True):
                g.addcmul_(d, w, value=strength)  # type: ignore[arg-type]
        if not with_value:
            return torch.zeros((), device=diffs[0].device)
        torch._foreach_mul_(diffs, diffs)  # d^2, in place
        return torch.stack([torch.dot(w.reshape(-1), d.reshape(-1)) for w, d in zip(weights, diffs, strict=True)]).sum()  # type: ignore[union-attr]

    def _apply_mergeable(self, name: str, layer: nn.Module, in_optimizer: set[int], strength: float) -> torch.Tensor:
        params = {k: p for k, p in adapter_parameters(layer).items() if p.requires_grad and id(p) in in_optimizer}
        if not params:
            return torch.zeros(())
        anchors = {k: v.to(p.dtype) for k, v, p in _zip_params(self.mergeable_anchors[name], layer)}
        row, col = self.factors(name)
        n_in = int(getattr(layer, "in_features"))  # noqa: B009
        n_out = int(getattr(layer, "out_features"))  # noqa: B009
        step = max(1, (1 << 22) // max(n_out, 1))  # columns per chunk: ~4M entries of the (out, in) change
        total = torch.zeros((), dtype=torch.float32)
        grads = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}
        device = next(iter(params.values())).device
        for start in range(0, n_in, step):
            columns = torch.arange(start, min(n_in, start + step), device=device)
            with torch.enable_grad():
                now = effective_weight_columns(layer, columns)  # (c, out)
                with torch.no_grad():
                    then = effective_weight_columns(layer, columns, anchors)  # (c, out)
                value = weighted_delta_penalty(
                    (now - then).T, row, None if col is None else col[columns.to(col.device)]
                )
                parts = torch.autograd.grad(value, list(params.values()), allow_unused=True)
            for (k, _), g in zip(params.items(), parts, strict=True):
                if g is not None:
                    grads[k] += g.float()
            total = total + 2 * value.detach().float().cpu()
        for k, p in params.items():
            _grad_local(p).add_(grads[k], alpha=strength)
        return total.to(device)

    # ------------------------------------------------------------------ checkpoints
    def tensor_state(self) -> dict[str, Any]:
        """Whole (gathered) CPU tensors of the state; subclasses add theirs."""
        assert self.targets is not None
        dense = self.targets.dense
        out: dict[str, Any] = {"anchors": {n: gather_like(v, dense[n]).cpu() for n, v in self.anchors.items()}}
        lowrank = {}
        for name, (a0, b0) in self.lowrank_anchors.items():
            a, b, _ = self.targets.lowrank[name].low_rank_factors()  # type: ignore[operator]
            lowrank[name] = (gather_like(a0, a).cpu(), gather_like(b0, b).cpu())
        out["lowrank_anchors"] = lowrank
        out["mergeable_anchors"] = {n: {k: v.cpu() for k, v in d.items()} for n, d in self.mergeable_anchors.items()}
        return out

    def load_tensor_state(self, state: dict[str, Any], pl_module: pl.LightningModule) -> None:
        """Install whole tensors from a checkpoint as local shards on the parameters' devices."""
        assert self.targets is not None
        dense = self.targets.dense
        saved = state["anchors"]
        if set(saved) != set(dense):
            only_saved, only_model = sorted(set(saved) - set(dense))[:3], sorted(set(dense) - set(saved))[:3]
            raise RuntimeError(
                f"{type(self).__name__}({self.name}): the checkpoint's anchors cover other parameters than the model's "
                f"trainable ones (only in the checkpoint: {only_saved}, only in the model: {only_model}). Resume with "
                "the model and adapters it was saved with."
            )
        self.anchors = {n: shard_like(v.float(), dense[n]).to(local(dense[n]).device) for n, v in saved.items()}
        self.lowrank_anchors = {}
        for name, (a0, b0) in state["lowrank_anchors"].items():
            a, b, _ = self.targets.lowrank[name].low_rank_factors()  # type: ignore[operator]
            self.lowrank_anchors[name] = (
                shard_like(a0.float(), a).to(local(a).device),
                shard_like(b0.float(), b).to(local(b).device),
            )
        self.mergeable_anchors = {}
        for name, values in state["mergeable_anchors"].items():
            params = adapter_parameters(self.targets.mergeable[name])
            self.mergeable_anchors[name] = {k: v.float().to(params[k].device) for k, v in values.items()}

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.targets is None:
            return
        checkpoint.setdefault(_CHECKPOINT_KEY, {})[self.state_key] = self.tensor_state()

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        saved = checkpoint.get(_CHECKPOINT_KEY, {}).get(self.state_key)
        if saved is None:
            rank_zero_info(
                f"{type(self).__name__}({self.name}): the checkpoint holds no state for this callback; it starts a new "
                "task at the restored weights."
            )
        self._restored = saved

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"strength": self._strength, "task_count": self.task_count, "name": self.name}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._strength = check_strength(state_dict["strength"], type(self).__name__)
        self.task_count = int(state_dict["task_count"])


def _groups(names: list[str], anchors: dict[str, torch.Tensor], budget: int = 1 << 24) -> list[list[str]]:
    """Consecutive groups of about ``budget`` elements: bounds the fp32 temporaries of one group (2 x 64 MiB)."""
    groups: list[list[str]] = []
    current: list[str] = []
    size = 0
    for name in names:
        n = anchors[name].numel()
        if current and size + n > budget:
            groups.append(current)
            current, size = [], 0
        current.append(name)
        size += n
    if current:
        groups.append(current)
    return groups


def _logging_step(trainer: pl.Trainer) -> bool:
    """Whether the loggers take this step's metrics (Lightning's own test), or it is the first or the last step."""
    step = trainer.global_step + 1
    if step == 1 or (trainer.max_steps is not None and 0 < trainer.max_steps <= step):
        return True
    connector = getattr(trainer, "_logger_connector", None)
    if connector is not None and hasattr(connector, "should_update_logs"):
        return bool(connector.should_update_logs)
    return step % max(1, trainer.log_every_n_steps) == 0


def _grad_local(p: torch.Tensor) -> torch.Tensor:
    """The local shard of ``p.grad``, created as zeros when the step left it ``None``."""
    if p.grad is None:
        p.grad = torch.zeros_like(p)
    return local(p.grad)


def _zip_params(values: dict[str, torch.Tensor], layer: nn.Module) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    params = adapter_parameters(layer)
    return [(k, v.to(params[k].device), params[k]) for k, v in values.items()]


__all__ = ["WeightPenalty", "full", "gather_like", "local", "shard_like"]

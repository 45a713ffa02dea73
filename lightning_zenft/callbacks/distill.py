r"""``DistillToBase``: a KL term that keeps the fine-tuned model's predictions near the base model's.

.. math::  \mathcal{L} = \mathcal{L}_{task} + w\, \tau^2\, \frac{1}{N} \sum_{t}
           \mathrm{KL}\big(\mathrm{softmax}(z^{base}_t / \tau) \,\|\, \mathrm{softmax}(z_t / \tau)\big)

over the ``N`` attended positions of the batch (Hinton et al. 2015; the ``tau^2`` keeps the gradient's size
independent of the temperature). Learning without Forgetting (Li & Hoiem 2016) applies it to the old model's outputs.

**How the term reaches the gradients without changing the loss.** A callback cannot change the loss Lightning
back-propagates. The KL term depends on the student only through its logits ``z``, and its gradient there is known in
closed form:

.. math::  \partial / \partial z_t = w\, \tau\, (\mathrm{softmax}(z_t/\tau) - \mathrm{softmax}(z^{base}_t/\tau)) / N.

So a forward hook on the model computes the base logits when the student runs in a training step, and registers a
tensor hook on the student's logits that adds this gradient to the one the task loss sends back. The user's backward
then carries both terms through the network: the result is the gradient of ``task_loss + w * KL``, with no second
forward or backward of the student. The added gradient is divided by ``accumulate_grad_batches`` (as Lightning
divides the loss) and multiplied by the AMP grad scaler's scale when there is one (fp16).

**The base outputs.** With adapters the same model runs again inside
:func:`~lightning_zenft.disable_adapters` under ``no_grad`` (no second copy of the weights). Without adapters (full
fine-tuning) a frozen copy is taken at the first fit start, optionally on another device (``teacher_device="cpu"``)
or in another dtype, and saved in checkpoints so a resumed run distils toward the same base. (A 4-bit copy waits for
the NF4 precision plugin.)

``batches="replay"`` restricts the term to the general rows a :class:`~lightning_zenft.Replay` callback appended.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from typing_extensions import override

from lightning_zenft.adapters import disable_adapters, find_adapters


def _logits(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    value = getattr(output, "logits", None)
    if value is None and isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        value = output[0]
    return value


class DistillToBase(Callback):
    """Add ``weight * tau^2 * KL(base || model)`` at temperature ``tau`` to the training gradient (module docstring).

    Args:
        weight: ``w`` (> 0).
        temperature: ``tau`` (> 0).
        batches: ``"all"`` (the training batches) or ``"replay"`` (only the rows a ``Replay`` callback appended).
        student: attribute of the LightningModule holding the model whose forward returns logits (``"model"``); the
            LightningModule itself when it has no such attribute.
        teacher_device: for full fine-tuning: where the frozen copy lives (``None``: with the model; e.g. ``"cpu"``).
        teacher_dtype: for full fine-tuning: the copy's dtype (``None``: the model's).
        name: metric prefix and state key (``"distill"``).

    Example::

        trainer = L.Trainer(callbacks=[LoRA(r=16), DistillToBase(weight=0.5, temperature=2.0)])
        trainer.fit(module, datamodule)
    """

    def __init__(
        self,
        weight: float = 1.0,
        temperature: float = 1.0,
        batches: Literal["all", "replay"] = "all",
        student: str = "model",
        teacher_device: str | torch.device | None = None,
        teacher_dtype: torch.dtype | None = None,
        name: str = "distill",
    ) -> None:
        problems = []
        if not weight > 0:
            problems.append(f"weight={weight} must be > 0")
        if not temperature > 0:
            problems.append(f"temperature={temperature} must be > 0")
        if batches not in ("all", "replay"):
            problems.append(f"batches={batches!r} must be 'all' or 'replay'")
        if problems:
            raise ValueError("DistillToBase: " + "; ".join(problems) + ".")
        self.weight = float(weight)
        self.temperature = float(temperature)
        self.batches = batches
        self.student = student
        self.teacher_device = None if teacher_device is None else torch.device(teacher_device)
        self.teacher_dtype = teacher_dtype
        self.name = name
        self.teacher: nn.Module | None = None  # the frozen copy (full fine-tuning only)
        self.last_kl: torch.Tensor | None = None
        self._teacher_state: dict[str, torch.Tensor] | None = None
        self._model: nn.Module | None = None
        self._handle: Any = None
        self._active = False
        self._in_teacher = False
        self._replay: Any = None
        self._scale: Callable[[], float] = lambda: 1.0
        self._kl_sum: torch.Tensor | None = None
        self._loss_sum: torch.Tensor | None = None
        self._pending = 0  # logits tensors whose gradient hook has not fired yet

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    # ------------------------------------------------------------------ set-up
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        strategy = type(trainer.strategy).__name__
        if any(s in strategy for s in ("FSDP", "ModelParallel", "DeepSpeed")):
            raise RuntimeError(
                f"DistillToBase cannot serve {strategy}: the base model runs inside the student's forward hook, "
                "which a sharding strategy's own forward hooks surround (parameters may already be resharded). Use a "
                "single device or DDP."
            )
        if self.batches == "replay":
            replays = [c for c in trainer.callbacks if type(c).__name__ == "Replay"]  # type: ignore[attr-defined]
            if not replays:
                raise RuntimeError(
                    "DistillToBase(batches='replay') needs a Replay callback in the Trainer (it distils on the general "
                    "rows Replay appends); add one or use batches='all'."
                )
            self._replay = replays[0]

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = getattr(pl_module, self.student, None)
        self._model = model if isinstance(model, nn.Module) else pl_module
        adapters = any(True for _ in find_adapters(self._model))
        if not adapters and self.teacher is None:
            self.teacher = copy.deepcopy(self._model).eval().requires_grad_(False)
            if self.teacher_device is not None or self.teacher_dtype is not None:
                self.teacher.to(device=self.teacher_device, dtype=self.teacher_dtype)
            if self._teacher_state is not None:  # resumed: the base the saved run distilled toward
                self.teacher.load_state_dict(self._teacher_state)
                self._teacher_state = None
        precision = trainer.precision_plugin
        scaler = getattr(precision, "scaler", None)
        self._scale = (lambda: float(scaler.get_scale())) if scaler is not None else (lambda: 1.0)
        self._handle = self._model.register_forward_hook(self._forward_hook, with_kwargs=True)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    # ------------------------------------------------------------------ the step
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._active = True
        self._accumulate = max(1, int(trainer.accumulate_grad_batches)) if pl_module.automatic_optimization else 1

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._active = False

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        loss = loss.detach().float()
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending:
            self._pending = 0
            raise RuntimeError(
                "DistillToBase: the loss sent no gradient to the student's logits, so the distillation term could not "
                "be added. Compute the loss from the logits the model returns (a fused linear cross-entropy that never "
                "materializes logits cannot be distilled)."
            )

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._kl_sum is None:
            return
        term = self.weight * self._kl_sum
        self.last_kl = self._kl_sum.detach()
        pl_module.log(f"{self.name}/kl", self._kl_sum, on_step=True, on_epoch=False, batch_size=1)
        if self._loss_sum is not None:
            share = term / (self._loss_sum + term).clamp_min(1e-30)
            pl_module.log(f"{self.name}/share", share, on_step=True, on_epoch=False, batch_size=1)
        self._kl_sum = self._loss_sum = None

    def _forward_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if not self._active or self._in_teacher or not torch.is_grad_enabled() or not module.training:
            return
        logits = _logits(output)
        if logits is None or not logits.requires_grad:
            raise RuntimeError(
                f"DistillToBase: the student ({type(module).__name__}) returned no logits that require grad; it needs "
                "the model's logits (output.logits) to distil (a fused linear cross-entropy returns none)."
            )
        rows = self._rows(logits.shape[0])
        if rows is not None and rows.stop - rows.start == 0:
            return
        teacher_logits = self._teacher_logits(module, args, kwargs)  # (B, T, V)
        mask = kwargs.get("attention_mask")
        mask = torch.ones(logits.shape[:-1], device=logits.device) if mask is None else mask.to(logits.device)
        sel = slice(None) if rows is None else rows
        mask = mask[sel].float()  # (b, T)
        n = mask.sum().clamp_min(1.0)
        tau = self.temperature
        p_base = torch.softmax(teacher_logits[sel].float() / tau, dim=-1)  # (b, T, V)
        log_q = torch.log_softmax(logits[sel].detach().float() / tau, dim=-1)  # (b, T, V)
        kl = (p_base * (torch.log(p_base.clamp_min(1e-30)) - log_q)).sum(-1)  # (b, T)
        kl_mean = (kl * mask).sum() / n * tau * tau
        self._kl_sum = kl_mean / self._accumulate if self._kl_sum is None else self._kl_sum + kl_mean / self._accumulate
        coeff = self.weight * tau / n / self._accumulate
        self._pending += 1

        def add_kl_gradient(grad: torch.Tensor) -> torch.Tensor:
            self._pending -= 1
            q = log_q.exp()  # (b, T, V)
            extra = coeff * self._scale() * (q - p_base) * mask[..., None]  # (b, T, V)
            out = grad.clone()
            out[sel] += extra.to(grad.dtype)
            return out

        logits.register_hook(add_kl_gradient)

    def _rows(self, total: int) -> slice | None:
        if self.batches == "all":
            return None
        general = int(self._replay.general_rows)
        return slice(total - general, total)

    @torch.no_grad()
    def _teacher_logits(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        inputs = {k: v for k, v in kwargs.items() if k != "labels"}
        self._in_teacher = True
        try:
            if self.teacher is None:
                with disable_adapters(module):
                    out = module(*args, **inputs)
            else:
                device = next(self.teacher.parameters()).device
                moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
                out = self.teacher(*[a.to(device) if isinstance(a, torch.Tensor) else a for a in args], **moved)
        finally:
            self._in_teacher = False
        logits = _logits(out)
        if logits is None:
            raise RuntimeError("DistillToBase: the base model returned no logits.")
        return logits.detach()

    # ------------------------------------------------------------------ checkpoints
    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.teacher is not None:  # full fine-tuning: the base weights, so a resumed run distils toward them
            state = {k: v.detach().cpu() for k, v in self.teacher.state_dict().items()}
            checkpoint.setdefault("zenft_distill_teachers", {})[self.state_key] = state

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._teacher_state = checkpoint.get("zenft_distill_teachers", {}).get(self.state_key)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"weight": self.weight, "temperature": self.temperature, "batches": self.batches}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = (state_dict["weight"], state_dict["temperature"], state_dict["batches"])
        if saved != (self.weight, self.temperature, self.batches):
            raise RuntimeError(
                f"DistillToBase: the checkpoint was written with (weight, temperature, batches) = {saved}, this "
                f"callback has {(self.weight, self.temperature, self.batches)}; resume with the settings it was saved "
                "with."
            )


__all__ = ["DistillToBase"]

"""``ForgettingMonitor``: measure general probes while fine-tuning, log what forgetting costs, act on a limit.

Practitioners track a general benchmark beside the task metric while fine-tuning (forgetting should stay under about
2 points with LoRA; alert above 5). This callback does that inside ``Trainer.fit``:

1. ``on_train_start``: every probe is measured once, the **baseline** (a resumed run keeps its baseline: the history
   lives in the callback's state, saved in checkpoints).
2. Every ``every_n_steps`` optimizer steps and at the end of training: measured again, and logged as
   ``forgetting/<probe>/<metric>`` and ``forgetting/<probe>/<metric>_change`` (from the baseline), plus
   ``forgetting/<probe>/drop`` (baseline accuracy minus accuracy, points), ``forgetting/worst_drop`` and
   ``forgetting/within_limits``. They also land in ``trainer.callback_metrics`` (for ``EarlyStopping`` or a
   ``ModelCheckpoint``) and the progress bar shows ``forgetting`` (the worst drop).
3. With adapters in the model, language-modelling probes also log ``kl_to_base``, the mean per-token
   ``KL(p_base || p)``, computed by running the same model inside ``disable_adapters`` (no second copy of the
   weights). Without adapters (full fine-tuning) there is no base to switch back to: the KL is skipped with an info
   line, unless ``kl="copy"`` keeps a frozen copy of the model made at ``setup`` (twice the weights' memory).
4. A drop beyond ``max_drop`` points (or a loss rise beyond ``max_loss_increase`` nats per token) on any probe
   triggers ``on_exceed``: ``"warn"``; ``"stop"`` (``trainer.should_stop`` and a checkpoint written through the
   Trainer to ``checkpoint_dir``); ``"raise_ewc"`` (``scale_strength(strength_factor)`` on every callback of the
   Trainer that has it, e.g. ``EWC``/``L2SP``; with none, ``fit`` fails at setup); ``"rollback"`` (the trainable
   parameters and optimizer state go back to the last measurement within the limits and the learning rates are
   multiplied by ``rollback_lr_factor``, at most ``max_rollbacks`` times, then it stops as ``"stop"`` does). At the end
   of training ``"stop"`` and ``"raise_ewc"`` only warn (nothing is left to stop) and ``"rollback"`` restores (while
   rollbacks remain; then it warns).

Under DDP and FSDP every process scores its shard of each probe and the metrics sum the counts across processes, so
all processes see the same numbers and take the same action. ``within_limits()`` and ``history`` tell other
callbacks (a merge at the end of fit, :class:`~lightning_zenft.callbacks.pareto_checkpoint.ParetoCheckpoint`) where
the model stands. W&B gets a probes x steps table and an image of the curves at every measurement, TensorBoard the
image, every logger the scalars; ``plot_path`` writes the curves as a PNG at the end.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_zenft.adapters import disable_adapters, find_adapters
from lightning_zenft.callbacks import _forgetting_actions as actions
from lightning_zenft.callbacks import _forgetting_report as reporting
from lightning_zenft.callbacks._forgetting_args import check_arguments, infer_mode
from lightning_zenft.callbacks._probe_eval import HEADLINE, evaluate_probe
from lightning_zenft.data.probes import Normalize, Probe, default_probes, load_probe
from lightning_zenft.reporting import loggers as report
from lightning_zenft.reporting.records import ForgettingRecord

OnExceed = Literal["warn", "stop", "raise_ewc", "rollback"]
KLMode = Literal["auto", "adapters", "copy", "off"]
ForwardFn = Callable[[nn.Module, dict[str, torch.Tensor]], Any]


class ForgettingMonitor(Callback):
    """Measure probe sets before and during fine-tuning; log the change; warn, stop, raise EWC or roll back.

    Args:
        probes: ``{name: probe}`` of the general abilities to keep: ``DataLoader``s of LM batches or of
            multiple-choice records, JSONL paths (``{"question", "choices", "answer"}`` or ``{"text"}``), or
            :class:`~lightning_zenft.data.probes.LMProbe`/``ChoiceProbe`` objects. ``None``: the built-in probes for
            the embedded base model (held-out stdlib text and the shipped Python questions).
        every_n_steps: measure every this many optimizer steps (and at the end of training).
        max_drop: the limit on any probe's accuracy drop from its baseline, in points; ``None``: no accuracy limit.
        max_loss_increase: the limit on any probe's loss rise from its baseline, nats per token; ``None``: none.
        on_exceed: ``"warn"``, ``"stop"``, ``"raise_ewc"`` or ``"rollback"`` (see the module docstring).
        task_probes: probes of the task being learnt, measured at the same steps but never limited.
        task_metric: the task figure recorded with each measurement: ``"<task probe>/<metric>"`` or a name in
            ``trainer.callback_metrics`` (e.g. ``"val_loss"``, its latest value). Default: the first task probe's
            accuracy.
        task_mode: ``"max"`` or ``"min"`` for the task metric; default: ``"min"`` for names with loss/perplexity/kl.
        tokenizer: encodes JSONL and built-in probes (an object or a directory); default: the datamodule's
            ``tokenizer``, else the tokenizer saved with ``pl_module.model_name_or_path``.
        batch_size: rows (LM) or questions (multiple choice) per forward pass for probes this callback builds.
        max_length: the longest row of a probe built from text.
        normalize: multiple-choice scoring by summed (``"sum"``) or per-token mean (``"mean"``) log-likelihood.
        model_attr: the LightningModule attribute holding the model (``""``: the module itself).
        forward_fn: ``forward_fn(model, {"input_ids", "attention_mask"}) -> logits (B, T, V)``; default: the
            model's ``logits`` output.
        kl: ``"auto"`` (with adapters, else skipped), ``"adapters"``, ``"copy"`` (a frozen copy) or ``"off"``.
            PiSSA-initialised LoRA layers rewrite their base weight, so disabling them runs the residual weight,
            not the original base: use ``"copy"`` for them.
        strength_factor: what ``"raise_ewc"`` multiplies the strengths by.
        max_rollbacks: how many rollbacks ``"rollback"`` makes before it stops training.
        rollback_lr_factor: learning rates are multiplied by this at each rollback.
        checkpoint_dir: where ``"stop"`` writes its checkpoint; default ``<default_root_dir>/forgetting``.
        eval_at_end: measure once more when training ends (if the last step was not measured).
        log_table: a W&B table of probes x steps at every measurement.
        log_image: the curves as an image on W&B and TensorBoard at every measurement.
        log_artifact: at the end, the adapter (PEFT format) as a W&B artifact; needs a ``WandbLogger`` and adapters.
        plot_path: at the end, the curves as a PNG here (relative paths under ``default_root_dir``).
        prog_bar: show the worst drop in the progress bar as ``forgetting``.

    Example:
        >>> import torch
        >>> from lightning_zenft.data.probes import LMProbe
        >>> general = LMProbe.from_rows([torch.arange(16), torch.arange(5, 21)])  # or a DataLoader, or "probe.jsonl"
        >>> monitor = ForgettingMonitor(probes={"general": general}, every_n_steps=200, max_drop=5.0, on_exceed="stop")
        >>> monitor.every_n_steps, monitor.history
        (200, [])

        In a run (``general_loader`` a DataLoader of LM batches, ``mc_probe.jsonl`` multiple-choice records)::

            monitor = ForgettingMonitor(probes={"general": general_loader, "mmlu_sample": "mc_probe.jsonl"},
                                        every_n_steps=200, max_drop=5.0, on_exceed="stop")
            trainer = L.Trainer(callbacks=[LoRA(r=16), monitor], logger=WandbLogger(project="ft"))
            trainer.fit(module, datamodule)
            monitor.within_limits(), monitor.history[-1]["drops"]
    """

    def __init__(
        self,
        probes: Mapping[str, Any] | None = None,
        every_n_steps: int = 200,
        max_drop: float | None = 5.0,
        max_loss_increase: float | None = None,
        on_exceed: OnExceed = "warn",
        task_probes: Mapping[str, Any] | None = None,
        task_metric: str | None = None,
        task_mode: Literal["min", "max"] | None = None,
        tokenizer: Any = None,
        batch_size: int = 8,
        max_length: int = 256,
        normalize: Normalize = "sum",
        model_attr: str = "model",
        forward_fn: ForwardFn | None = None,
        kl: KLMode = "auto",
        strength_factor: float = 2.0,
        max_rollbacks: int = 2,
        rollback_lr_factor: float = 0.5,
        checkpoint_dir: str | Path | None = None,
        eval_at_end: bool = True,
        log_table: bool = True,
        log_image: bool = True,
        log_artifact: bool = False,
        plot_path: str | Path | None = None,
        prog_bar: bool = True,
    ) -> None:
        problems = check_arguments(locals())
        if problems:
            raise ValueError("ForgettingMonitor: " + "; ".join(problems) + ".")
        self.probe_specs = dict(probes) if probes is not None else None
        self.task_specs = dict(task_probes or {})
        self.every_n_steps, self.max_drop, self.max_loss_increase = every_n_steps, max_drop, max_loss_increase
        self.on_exceed: OnExceed = on_exceed
        self.task_metric = task_metric or (f"{next(iter(self.task_specs))}/{HEADLINE}" if self.task_specs else None)
        self.task_mode = task_mode or (None if self.task_metric is None else infer_mode(self.task_metric))
        self.tokenizer, self.batch_size, self.max_length, self.normalize = tokenizer, batch_size, max_length, normalize
        self.model_attr, self.forward_fn, self.kl = model_attr, forward_fn, kl
        self.strength_factor, self.max_rollbacks, self.rollback_lr_factor = (
            strength_factor,
            max_rollbacks,
            rollback_lr_factor,
        )
        self.checkpoint_dir, self.eval_at_end = checkpoint_dir, eval_at_end
        self.log_table, self.log_image, self.log_artifact = log_table, log_image, log_artifact
        self.plot_path, self.prog_bar = plot_path, prog_bar
        # state (saved in checkpoints)
        self.history: list[ForgettingRecord] = []
        self.rollbacks = 0
        self.lr_scale = 1.0
        self._within = True
        self._snapshot: actions.Snapshot | None = None
        # resolved at setup / train start
        self.probes: dict[str, Probe] = {}
        self.task_probe_objects: dict[str, Probe] = {}
        self.kl_mode: Literal["adapters", "copy", "off"] = "off"
        self._base_copy: nn.Module | None = None
        self._strength_callbacks: list[Callback] = []
        self.stop_checkpoint: Path | None = None
        self.plot_written: Path | None = None
        self._task_warned = False

    @property
    @override
    def state_key(self) -> str:
        names = sorted(self.probe_specs or ["<default>"])
        return self._generate_state_key(probes=names, every_n_steps=self.every_n_steps)

    @property
    def baseline(self) -> dict[str, dict[str, float]] | None:
        """The probes' metrics before training (the first record), or ``None`` before it is measured."""
        return self.history[0]["metrics"] if self.history else None

    def within_limits(self) -> bool:
        """Whether the model as it is now was measured within the limits (after a rollback: the restored state)."""
        if not self.history:
            raise RuntimeError("ForgettingMonitor has measured nothing yet; within_limits() is known from fit's start.")
        return self._within

    # ------------------------------------------------------------------ set-up
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        tokenizer = self._find_tokenizer(trainer, pl_module)
        common = dict(
            tokenizer=tokenizer, batch_size=self.batch_size, max_length=self.max_length, normalize=self.normalize
        )
        if self.probe_specs is None:
            if tokenizer is None:
                raise ValueError(
                    "ForgettingMonitor(probes=None) builds the built-in probes from text and needs a tokenizer: pass "
                    "tokenizer=..., or use a datamodule with a `tokenizer` or a module with `model_name_or_path`."
                )
            self.probes = default_probes(tokenizer, self.batch_size)
        else:
            self.probes = {n: load_probe(s, name=n, **common) for n, s in self.probe_specs.items()}  # type: ignore[arg-type]
        self.task_probe_objects = {n: load_probe(s, name=n, **common) for n, s in self.task_specs.items()}  # type: ignore[arg-type]
        if self.on_exceed == "raise_ewc":
            self._strength_callbacks = actions.strength_callbacks(trainer, exclude=self)
            if not self._strength_callbacks:
                names = [type(cb).__name__ for cb in trainer.callbacks]
                raise RuntimeError(
                    f"ForgettingMonitor(on_exceed='raise_ewc') found no callback with a scale_strength(factor) method "
                    f"among the Trainer's callbacks {names}. Add EWC(...) or L2SP(...) to the callbacks, or choose "
                    "on_exceed='warn', 'stop' or 'rollback'."
                )
        if self.log_artifact:
            report.require_wandb()
            if not report.takes_tables(trainer.loggers):
                raise RuntimeError(
                    "ForgettingMonitor(log_artifact=True) logs the adapter to W&B, but the Trainer has no WandbLogger; "
                    "add logger=WandbLogger(...) or set log_artifact=False."
                )
        if self.kl == "copy":
            self._make_base_copy(trainer, pl_module)

    def _find_tokenizer(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        source = self.tokenizer
        if source is None:
            source = getattr(trainer.datamodule, "tokenizer", None) if trainer.datamodule is not None else None
        if source is None:
            source = getattr(pl_module, "model_name_or_path", None)
        if isinstance(source, (str, Path)):
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(source))
        return source

    def _make_base_copy(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

        if isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy)):
            raise RuntimeError(
                f"ForgettingMonitor(kl='copy') keeps a whole copy of the model on each process, which a sharded "
                f"strategy ({type(trainer.strategy).__name__}) exists to avoid. Use adapters (kl='adapters') or "
                "kl='off'."
            )
        model = self._model(pl_module)
        if not any(True for _ in model.parameters()):
            raise RuntimeError(
                "ForgettingMonitor(kl='copy') copies the model at setup, but it has no parameters yet (built in "
                "configure_model?). Build the model in __init__, or use kl='off'."
            )
        self._base_copy = copy.deepcopy(model).eval().requires_grad_(False)

    # ------------------------------------------------------------------ measuring
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.kl_mode = self._resolve_kl(pl_module)
        if self.log_artifact and not any(True for _ in find_adapters(pl_module)):
            raise RuntimeError("ForgettingMonitor(log_artifact=True) saves the adapter, but the model has no adapters.")
        if self.history:
            rank_zero_info(f"ForgettingMonitor: resumed with the baseline of step {self.history[0]['step']}.")
            return
        self._measure_and_act(trainer, pl_module)

    def _resolve_kl(self, pl_module: pl.LightningModule) -> Literal["adapters", "copy", "off"]:
        has_adapters = any(True for _ in find_adapters(pl_module))
        if self.kl == "copy":
            assert self._base_copy is not None
            self._base_copy.to(pl_module.device)
            return "copy"
        if self.kl == "off":
            return "off"
        if has_adapters:
            return "adapters"
        if self.kl == "adapters":
            raise RuntimeError(
                "ForgettingMonitor(kl='adapters') computes the KL to the base with the adapters disabled, but the "
                "model has no adapters. Use kl='copy' (a frozen copy of the model) or kl='off'."
            )
        rank_zero_info(
            "ForgettingMonitor: the model has no adapters, so there is no base model to switch back to; the KL to the "
            "base is not logged (kl='copy' keeps a frozen copy of the model for it)."
        )
        return "off"

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and self.history and self.history[-1]["step"] != step:
            self._measure_and_act(trainer, pl_module)
        if self.prog_bar and self.history:
            pl_module.log("forgetting", self.history[-1]["worst_drop"], prog_bar=True, logger=False, on_step=True)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.eval_at_end and self.history and self.history[-1]["step"] != trainer.global_step:
            self._measure_and_act(trainer, pl_module, at_end=True)
        if trainer.is_global_zero and self.plot_path is not None and self.history:
            path = Path(self.plot_path)
            path = path if path.is_absolute() else Path(trainer.default_root_dir) / path
            from lightning_zenft.reporting.plots import save_figure

            self.plot_written = save_figure(self._figure(), path)
            rank_zero_info(f"ForgettingMonitor: curves written to {self.plot_written}")
        if self.log_artifact and trainer.is_global_zero:
            reporting.log_adapter(trainer, self._model(pl_module), self.history[-1], self._within)

    def _model(self, pl_module: pl.LightningModule) -> nn.Module:
        return pl_module.get_submodule(self.model_attr) if self.model_attr else pl_module

    def _forward(self, trainer: pl.Trainer, model: nn.Module) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
        def run(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            with trainer.precision_plugin.forward_context():
                out = self.forward_fn(model, batch) if self.forward_fn else model(**batch)
            logits = getattr(out, "logits", out)
            if isinstance(logits, (tuple, list)):
                logits = logits[0]
            if not isinstance(logits, torch.Tensor) or logits.ndim != 3:
                raise TypeError(
                    f"ForgettingMonitor: the model returned {type(out).__name__}, not logits (B, T, V) or an output "
                    "with .logits; pass forward_fn=lambda model, batch: <logits>."
                )
            return logits

        return run

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, dict[str, float]]:
        """Every probe's metrics for the model as it is now (all processes must call it together)."""
        model = self._model(pl_module)
        forward = self._forward(trainer, model)
        reference: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None
        if self.kl_mode == "adapters":
            base_forward = forward

            def reference(batch: dict[str, torch.Tensor]) -> torch.Tensor:
                with disable_adapters(model):
                    return base_forward(batch)

        elif self.kl_mode == "copy":
            assert self._base_copy is not None
            reference = self._forward(trainer, self._base_copy)
        modes = [(m, m.training) for m in pl_module.modules()]
        pl_module.eval()
        try:
            with torch.no_grad():
                return {
                    name: evaluate_probe(
                        probe,
                        forward,
                        pl_module.device,
                        trainer.global_rank,
                        trainer.world_size,
                        reference if name in self.probes else None,
                    )
                    for name, probe in {**self.probes, **self.task_probe_objects}.items()
                }
        finally:
            for module, mode in modes:
                module.training = mode

    def _task_value(self, trainer: pl.Trainer, metrics: dict[str, dict[str, float]]) -> float | None:
        if self.task_metric is None:
            return None
        probe, _, metric = self.task_metric.partition("/")
        if probe in self.task_probe_objects:
            if metric not in metrics[probe]:
                raise KeyError(f"task_metric={self.task_metric!r}: task probe {probe!r} has {sorted(metrics[probe])}.")
            return metrics[probe][metric]
        value = trainer.callback_metrics.get(self.task_metric)
        if value is None:
            if self.history and not self._task_warned:
                rank_zero_warn(
                    f"ForgettingMonitor: task_metric={self.task_metric!r} is not among the logged metrics "
                    f"{sorted(trainer.callback_metrics)} at step {trainer.global_step}; the record keeps None."
                )
                self._task_warned = True
            return None
        return float(value)

    def _measure_and_act(self, trainer: pl.Trainer, pl_module: pl.LightningModule, at_end: bool = False) -> None:
        metrics = self.measure(trainer, pl_module)
        base = self.history[0]["metrics"] if self.history else metrics
        drops = {n: base[n][HEADLINE] - metrics[n][HEADLINE] for n in self.probes}
        rises = {n: metrics[n]["loss"] - base[n]["loss"] for n in self.probes}
        beyond = [
            f"{n}: accuracy {metrics[n][HEADLINE]:.2f}, {drops[n]:.2f} points below its baseline "
            f"{base[n][HEADLINE]:.2f} (max_drop={self.max_drop:g})"
            for n in self.probes
            if self.max_drop is not None and drops[n] > self.max_drop
        ] + [
            f"{n}: loss {metrics[n]['loss']:.4f}, {rises[n]:.4f} above its baseline {base[n]['loss']:.4f} "
            f"(max_loss_increase={self.max_loss_increase:g})"
            for n in self.probes
            if self.max_loss_increase is not None and rises[n] > self.max_loss_increase
        ]
        record: ForgettingRecord = {
            "step": trainer.global_step,
            "metrics": metrics,
            "task": self._task_value(trainer, metrics),
            "drops": drops,
            "loss_increases": rises,
            "worst_drop": max(drops.values(), default=0.0),
            "within_limits": not beyond,
            "action": None,
        }
        self.history.append(record)
        self._within = not beyond
        if beyond:
            self._act(trainer, pl_module, record, beyond, at_end)
        elif self.on_exceed == "rollback":
            self._snapshot = actions.Snapshot.take(pl_module, trainer.optimizers, record["step"], self.lr_scale)
        self._report(trainer, record)

    # ------------------------------------------------------------------ acting
    def _act(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        record: ForgettingRecord,
        beyond: list[str],
        at_end: bool,
    ) -> None:
        step = record["step"]
        what = f"ForgettingMonitor: at step {step} forgetting is beyond the limit: " + "; ".join(beyond)
        mode = self.on_exceed
        if mode == "rollback" and self.rollbacks >= self.max_rollbacks:
            what += f". {self.rollbacks} rollback(s) made (max_rollbacks={self.max_rollbacks})"
            what += "" if at_end else ", so training stops"
            mode = "warn" if at_end else "stop"
        if mode == "warn" or (at_end and mode in ("stop", "raise_ewc")):
            record["action"] = "warn"
            rank_zero_warn(what + ("." if mode == "warn" else f" (on_exceed={mode!r}: training has already ended)."))
        elif mode == "stop":
            self.stop_checkpoint = self._stop(trainer, step)
            record["action"] = "stop"
            rank_zero_warn(f"{what}. Training stops; checkpoint: {self.stop_checkpoint}")
        elif mode == "raise_ewc":
            strengths = actions.raise_strengths(self._strength_callbacks, self.strength_factor)
            record["action"] = "raise_ewc"
            rank_zero_warn(f"{what}. Strengths multiplied by {self.strength_factor:g}: {strengths}")
        elif mode == "rollback":
            self._rollback(trainer, pl_module, record, what)

    def _stop(self, trainer: pl.Trainer, step: int) -> Path:
        trainer.should_stop = True
        directory = Path(self.checkpoint_dir or Path(trainer.default_root_dir) / "forgetting")
        if trainer.is_global_zero:
            directory.mkdir(parents=True, exist_ok=True)
        trainer.strategy.barrier("zenft_forgetting_dir")
        self.history[-1]["action"] = "stop"  # in the checkpoint's copy of the history too
        return actions.save_checkpoint_atomically(trainer, directory / f"forgetting-stop-step={step}.ckpt")

    def _rollback(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, record: ForgettingRecord, what: str
    ) -> None:
        snapshot = self._snapshot
        if snapshot is None:  # the baseline itself beyond the limit cannot happen; kept as an invariant
            raise RuntimeError("ForgettingMonitor: no measurement within the limits to roll back to.")
        self.lr_scale *= self.rollback_lr_factor
        snapshot.restore(pl_module, trainer.optimizers, self.lr_scale / snapshot.lr_scale)
        actions.scale_scheduler_lrs(trainer, self.rollback_lr_factor)
        self.rollbacks += 1
        self._within = True
        record["action"] = "rollback"
        rank_zero_warn(
            f"{what}. Rolled back to step {snapshot.step} (rollback {self.rollbacks} of {self.max_rollbacks}); "
            f"learning rates now x{self.lr_scale:g} of the original."
        )

    # ------------------------------------------------------------------ reporting
    def _report(self, trainer: pl.Trainer, record: ForgettingRecord) -> None:
        reporting.report_record(
            trainer, self.history, record, self.max_drop, self.task_metric, self.log_table, self.log_image
        )

    def _figure(self) -> Any:
        return reporting.figure_of(self.history, self.max_drop, self.task_metric)

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "history": copy.deepcopy(self.history),
            "rollbacks": self.rollbacks,
            "lr_scale": self.lr_scale,
            "within": self._within,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = copy.deepcopy(state_dict["history"])
        self.rollbacks = int(state_dict["rollbacks"])
        self.lr_scale = float(state_dict["lr_scale"])
        self._within = bool(state_dict["within"])

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._snapshot is not None:
            checkpoint.setdefault("zenft_forgetting_snapshots", {})[self.state_key] = self._snapshot.state()

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        state = checkpoint.get("zenft_forgetting_snapshots", {}).get(self.state_key)
        self._snapshot = actions.Snapshot.from_state(state) if state is not None else None

    def reset(self) -> None:
        """Forget the history (the next ``fit`` measures a new baseline)."""
        self.history, self.rollbacks, self.lr_scale, self._within, self._snapshot = [], 0, 1.0, True, None


__all__ = ["ForgettingMonitor"]

"""The ``LoRA`` and ``DoRA`` callbacks: adapters injected into any LightningModule, adapter-only checkpoints.

Where in ``Trainer.fit`` things happen (and why there):

1. ``setup``: target layers are swapped for adapter layers and everything else is frozen, before checkpoint restore,
   before the precision plugin converts the module and before a sharding strategy wraps it. A module that builds
   its layers in ``configure_model`` gets its adapters right after that hook instead.
2. ``configure_optimizers`` runs after that, so ``AdamW(self.parameters())`` already sees frozen base weights with
   ``requires_grad=False``. At ``on_fit_start`` the callback removes those frozen parameters from every optimizer
   (they would never step, but some optimizers still allocate state or apply weight decay to them) and checks every
   adapter parameter is optimized. Best practice in ``configure_optimizers``:
   ``torch.optim.AdamW(lightning_zenft.trainable_parameters(self), lr=...)``.
3. Checkpoints keep only the trained parameters (adapters, plus any bias/norm/module the config trains) and the
   callback's state (config, RNG state), not the frozen base: a 7B LoRA checkpoint is megabytes. ``ckpt_path=``
   restores them into a freshly injected model (fit, validate, test or predict) with Lightning's strict loading, which
   only forgives the absent frozen tensors: a missing adapter tensor or an unknown key is still an error.
   ``save_full_state_dict=True`` keeps the whole model in the checkpoint instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_zenft.adapters import DoRALinear, LoRALinear, adapter_parameter_names, find_adapters
from lightning_zenft.adapters._base import is_adaptable_linear
from lightning_zenft.config import LoRAConfig, TargetSpec
from lightning_zenft.inject import count_parameters, inject_adapters, pattern_value


def trainable_parameters(module: nn.Module) -> Iterator[nn.Parameter]:
    """The parameters of ``module`` that train (``requires_grad``): what an optimizer over an adapted model needs."""
    return (p for p in module.parameters() if p.requires_grad)


class LoRA(Callback):
    """Low-rank adapters on the target layers of the LightningModule, injected at ``setup``.

    Args:
        r: rank, or ``"auto"`` to take the recommended rank for the model size and the training set size.
        alpha: scale numerator; ``None`` means ``2 * r``.
        dropout: dropout on the adapter input.
        target_modules: a preset (``"all-linear"``, ``"attention"``, ``"mlp"``), a list of names/suffixes or a regex.
        exclude_modules: layers to skip (names/suffixes or a regex).
        use_rslora: scale by ``alpha / sqrt(r)``.
        init: ``"kaiming"``, ``"gaussian"``, ``"pissa"``, or ``"loftq"`` (with ``NF4Precision``: LoftQ at setup).
        rank_pattern: per-layer ranks, ``{name_suffix_regex: r}``.
        alpha_pattern: per-layer alphas.
        bias: which biases train: ``"none"``, ``"all"``, ``"lora_only"``.
        trainable_norms: also train normalization layers.
        modules_to_save: modules trained in full (e.g. a new classification head).
        save_full_state_dict: keep the frozen base in Lightning checkpoints too.
        loftq_iters: LoftQ's number of alternations of quantization and SVD (``init="loftq"``).

    Example::

        trainer = L.Trainer(callbacks=[LoRA(r=16, alpha=32, target_modules="all-linear")])
        trainer.fit(module)
        save_adapter(module.model, "out/adapter")
    """

    use_dora: bool = False

    def __init__(
        self,
        r: int | Literal["auto"] = 8,
        alpha: float | None = None,
        dropout: float = 0.0,
        target_modules: TargetSpec = "all-linear",
        exclude_modules: TargetSpec | None = None,
        use_rslora: bool = False,
        init: Literal["kaiming", "gaussian", "pissa", "loftq"] = "kaiming",
        rank_pattern: dict[str, int] | None = None,
        alpha_pattern: dict[str, float] | None = None,
        bias: Literal["none", "all", "lora_only"] = "none",
        trainable_norms: bool = False,
        modules_to_save: list[str] | None = None,
        save_full_state_dict: bool = False,
        loftq_iters: int = 1,
    ) -> None:
        self.auto_rank = r == "auto"
        if isinstance(r, str) and not self.auto_rank:
            raise ValueError(f"r={r!r} must be a positive integer or 'auto'.")
        self._alpha = alpha
        self.config = LoRAConfig(
            r=8 if self.auto_rank else int(r),
            alpha=alpha,
            dropout=dropout,
            target_modules=target_modules,
            exclude_modules=exclude_modules,
            use_rslora=use_rslora,
            use_dora=self.use_dora,
            init=init,
            loftq_iters=loftq_iters,
            rank_pattern=dict(rank_pattern or {}),
            alpha_pattern=dict(alpha_pattern or {}),
            bias=bias,
            trainable_norms=trainable_norms,
            modules_to_save=list(modules_to_save or []),
        )
        self.save_full_state_dict = save_full_state_dict
        self.targets: list[str] = []
        self.trainable_params = 0
        self.total_params = 0
        self._trainable_keys: set[str] = set()

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(target_modules=str(self.config.target_modules), dora=self.use_dora)

    # ------------------------------------------------------------------ injection
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        existing = list(find_adapters(pl_module))
        if existing:
            if not self.targets:
                self._adopt(pl_module, existing)
            return  # adapters are in place (e.g. validate after fit, or a second Trainer on the same module)
        if not _has_linear_layers(pl_module) and _overrides_configure_model(pl_module):
            self._inject_after_configure_model(trainer, pl_module)
            return
        self._inject(trainer, pl_module)

    def _adopt(self, pl_module: pl.LightningModule, existing: list[tuple[str, Any]]) -> None:
        """Take over adapters injected earlier (by another Trainer's callback) if they are what this config makes."""
        layer_cls = DoRALinear if self.use_dora else LoRALinear
        for name, layer in existing:
            r = int(pattern_value(name, self.config.rank_pattern, self.config.r))
            alpha = float(pattern_value(name, self.config.alpha_pattern, self.config.alpha))
            if type(layer) is not layer_cls or layer.r != r or layer.alpha != alpha:
                raise RuntimeError(
                    f"{type(pl_module).__name__} already holds adapters that differ from this callback's settings "
                    f"({name}: {type(layer).__name__} r={getattr(layer, 'r', '?')}, wanted {layer_cls.__name__} r={r}, "
                    f"alpha={alpha:g}). Use one adapter callback per model, with the settings it was trained with."
                )
        self.targets = [name for name, _ in existing]
        self._record(pl_module)

    def _record(self, pl_module: pl.LightningModule) -> None:
        self.trainable_params, self.total_params = count_parameters(pl_module)
        self._trainable_keys = {n for n, p in pl_module.named_parameters() if p.requires_grad}
        if not self.save_full_state_dict:
            _accept_adapter_only_state(pl_module, self._trainable_keys)

    def _inject_after_configure_model(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        user_hook: Callable[[], None] = pl_module.configure_model

        def configure_model_then_inject() -> None:
            user_hook()
            if not any(True for _ in find_adapters(pl_module)):
                self._inject(trainer, pl_module)

        pl_module.configure_model = configure_model_then_inject  # type: ignore[method-assign]

    def _inject(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.auto_rank:
            self._resolve_auto_rank(trainer, pl_module)
        self.targets = inject_adapters(pl_module, self.config)
        if self.config.init == "loftq":
            from lightning_zenft.precision.loftq import apply_loftq

            device = trainer.strategy.root_device
            apply_loftq(pl_module, trainer.precision_plugin, self.config.loftq_iters, device=device)
        self._record(pl_module)
        rank_zero_info(
            f"{type(self).__name__}: {len(self.targets)} layers adapted; trainable params: {self.trainable_params:,} "
            f"|| all params: {self.total_params:,} || trainable%: {100 * self.trainable_params / self.total_params:.4f}"
        )

    def _resolve_auto_rank(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning_zenft.planning import resolve_lora_rank_auto

        n_samples = _count_training_samples(trainer)
        n_params = sum(p.numel() for p in pl_module.parameters())
        r = resolve_lora_rank_auto(n_params, n_samples)
        alpha = self._alpha if self._alpha is not None else float(2 * r)
        self.config = LoRAConfig(**{**self.config.to_dict(), "r": r, "alpha": alpha})
        rank_zero_info(f"{type(self).__name__}: r='auto' -> r={r} for {n_params:,} params and {n_samples:,} samples")

    # ------------------------------------------------------------------ optimizer
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        removed = 0
        optimized: set[int] = set()
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                kept = [p for p in group["params"] if p.requires_grad]
                removed += len(group["params"]) - len(kept)
                group["params"] = kept
                optimized.update(id(p) for p in kept)
        if removed:
            rank_zero_info(f"{type(self).__name__}: removed {removed} frozen parameter tensors from the optimizer.")
        params = dict(pl_module.named_parameters())
        missing = [n for n in adapter_parameter_names(pl_module) if id(params[n]) not in optimized]
        if trainer.optimizers and missing:
            raise RuntimeError(
                f"the optimizer does not hold {len(missing)} adapter parameters (e.g. {missing[:3]}). Build it in "
                "`configure_optimizers` from `lightning_zenft.trainable_parameters(self)` (or `self.parameters()`); "
                "it runs after the adapters are injected."
            )
        for logger in trainer.loggers:
            logger.log_hyperparams(
                {"zenft/trainable_params": self.trainable_params, "zenft/total_params": self.total_params}
            )

    # ------------------------------------------------------------------ checkpoints
    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.save_full_state_dict:
            return
        state = checkpoint.get("state_dict", {})
        checkpoint["state_dict"] = {k: v for k, v in state.items() if k in self._trainable_keys}

    @override
    def state_dict(self) -> dict[str, Any]:
        # The RNG state makes adapter dropout after a resume draw the same masks as an uninterrupted run would.
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {"config": self.config.to_dict(), "targets": list(self.targets), "rng": rng}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("config", {})
        current = self.config.to_dict()
        differ = {k: (saved[k], current[k]) for k in saved if k in current and saved[k] != current[k]}
        if differ:
            raise RuntimeError(
                f"{type(self).__name__} settings differ from the checkpoint's (saved, now): {differ}. Resume with the "
                "settings the checkpoint was written with."
            )
        if state_dict.get("targets") and list(state_dict["targets"]) != self.targets:
            raise RuntimeError("the checkpoint's adapted layers differ from this model's; was the model changed?")
        rng = state_dict.get("rng", {})
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])


class DoRA(LoRA):
    """Weight-decomposed low-rank adapters (Liu et al. 2024); same arguments as :class:`LoRA`.

    Example::

        trainer = L.Trainer(callbacks=[DoRA(r=8, target_modules="attention")])
    """

    use_dora = True


def _accept_adapter_only_state(pl_module: pl.LightningModule, trainable: set[str]) -> None:
    """Let ``load_state_dict`` (strict, as Lightning calls it for ``ckpt_path=``) accept adapter-only checkpoints.

    Missing keys of frozen tensors are dropped from the strict check; a missing trained tensor or any unexpected key
    still fails loudly. Registered once per module.
    """
    if getattr(pl_module, "_zenft_adapter_only_hook", None) is not None:
        return
    frozen = {k for k in pl_module.state_dict() if k not in trainable}

    def drop_frozen_missing(module: nn.Module, incompatible: Any) -> None:
        incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if k not in frozen]

    pl_module._zenft_adapter_only_hook = pl_module.register_load_state_dict_post_hook(drop_frozen_missing)


def _has_linear_layers(module: nn.Module) -> bool:
    return any(is_adaptable_linear(m) for m in module.modules())


def _overrides_configure_model(pl_module: pl.LightningModule) -> bool:
    return type(pl_module).configure_model is not pl.LightningModule.configure_model


def _count_training_samples(trainer: pl.Trainer) -> int:
    """The size of the training set: the datamodule's ``train_dataset``, else the fit dataloader's dataset."""
    datamodule: Any = trainer.datamodule
    data = getattr(datamodule, "train_dataset", None)
    if data is not None and hasattr(data, "__len__"):
        return len(data)
    source = getattr(trainer.fit_loop, "_data_source", None)
    loader = source.dataloader() if source is not None and source.is_defined() else None
    dataset = getattr(loader, "dataset", None)
    if dataset is not None and hasattr(dataset, "__len__"):
        return len(dataset)
    raise RuntimeError(
        "LoRA(r='auto') needs the training set size, but the training data has no length. Pass a datamodule with a "
        "sized `train_dataset` (or a DataLoader over a sized dataset) to trainer.fit, or give r explicitly."
    )


__all__ = ["DoRA", "LoRA", "trainable_parameters"]

"""The ``LoRA`` and ``DoRA`` callbacks: low-rank adapters injected into any LightningModule (see
:mod:`lightning_zenft.callbacks._adapter` for what every adapter callback does and when).

Example::

    trainer = L.Trainer(callbacks=[LoRA(r=16, alpha=32, target_modules="all-linear")])
"""

from __future__ import annotations

import dataclasses
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from lightning_zenft.callbacks._adapter import AdapterCallback, trainable_parameters
from lightning_zenft.config import LoRAConfig


class LoRA(AdapterCallback):
    """Low-rank adapters on the target layers of the LightningModule, injected at ``setup``.

    Args:
        r: rank, or ``"auto"`` to take the recommended rank for the model size and the training set size.
        alpha: scale numerator; ``None`` means ``2 * r``.
        dropout: dropout on the adapter input.
        target_modules: a preset (``"all-linear"``, ``"attention"``, ``"mlp"``), a list of names/suffixes or a regex.
        exclude_modules: layers to skip (names/suffixes or a regex).
        use_rslora: scale by ``alpha / sqrt(r)``.
        init: ``"kaiming"``, ``"gaussian"``, ``"pissa"``, or ``"loftq"`` (with ``NF4Precision``: LoftQ at setup).
        loftq_iters: LoftQ's number of alternations of quantization and SVD (``init="loftq"``).
        rank_pattern: per-layer ranks, ``{name_suffix_regex: r}``.
        alpha_pattern: per-layer alphas.
        bias: which biases train: ``"none"``, ``"all"``, ``"lora_only"``.
        trainable_norms: also train normalization layers.
        modules_to_save: modules trained in full (e.g. a new classification head).
        save_full_state_dict: keep the frozen base in Lightning checkpoints too.

    Example::

        trainer = L.Trainer(callbacks=[LoRA(r=16, alpha=32, target_modules="all-linear")])
        trainer.fit(module)
        save_adapter(module.model, "out/adapter")
    """

    config_cls = LoRAConfig
    config: LoRAConfig

    def resolve_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> LoRAConfig | None:
        if self.config.r != "auto":
            return self.config
        if trainer.state.fn != "fit":
            return None  # the rank comes from the checkpoint (validate/test/predict with ckpt_path=)
        from lightning_zenft.planning import resolve_lora_rank_auto

        n_samples = _count_training_samples(trainer)
        n_params = sum(p.numel() for p in pl_module.parameters())
        r = resolve_lora_rank_auto(n_params, n_samples)
        rank_zero_info(f"{type(self).__name__}: r='auto' -> r={r} for {n_params:,} params and {n_samples:,} samples")
        return dataclasses.replace(self.config, r=r)

    def after_injection(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.config.init == "loftq":  # Q and A, B from the plugin's own quantizer (precision.apply_loftq)
            from lightning_zenft.precision.loftq import apply_loftq

            device = trainer.strategy.root_device
            apply_loftq(pl_module, trainer.precision_plugin, self.config.loftq_iters, device=device)

    def config_from_checkpoint(self, saved: dict[str, Any]) -> LoRAConfig:
        r = saved.get("config", {}).get("r")
        if self.config.r != "auto" or not isinstance(r, int):
            return self.config
        return dataclasses.replace(self.config, r=r)

    def _compare_config(self, saved: dict[str, Any]) -> None:
        if self.config.r == "auto":  # not resolved yet: nothing this run chose to compare
            saved = {k: v for k, v in saved.items() if k not in ("r", "alpha")}
        super()._compare_config(saved)

    def _unresolved(self) -> str:
        return "r='auto' is resolved from the training set when fitting starts"


class DoRA(LoRA):
    """Weight-decomposed low-rank adapters (Liu et al. 2024); same arguments as :class:`LoRA`.

    Example::

        trainer = L.Trainer(callbacks=[DoRA(r=8, target_modules="attention")])
    """

    config_cls = LoRAConfig
    fixed_config = {"use_dora": True}


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

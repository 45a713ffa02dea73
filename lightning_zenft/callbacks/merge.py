"""``MergeAdapters``: at the end of ``fit``, merge the adapters into the base and export a plain model.

The export is :func:`lightning_zenft.merging.export_merged`: a ``save_pretrained``-style directory (sharded
safetensors, config, generation config, the tokenizer files of the source directory) written atomically, the model in
memory left as it is. 4-bit bases are dequantized (or requantized, ``quantized="requantize"``).

``only_within_limits=True`` merges only when every forgetting monitor in the same Trainer says the model is within its
limits. A monitor is any callback with a ``within_limits() -> bool`` method (``ForgettingMonitor`` provides it);
without one the option is an error at setup, not a silent merge.

Example::

    trainer = L.Trainer(callbacks=[LoRA(r=16), MergeAdapters("merged", dtype="bfloat16")])
    trainer.fit(module)        # merged/config.json + model.safetensors (+ tokenizer files)
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from typing_extensions import override

from lightning_zenft.merging.export import ExportReport, export_merged

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SHARDED_STRATEGIES = ("FSDPStrategy", "ModelParallelStrategy", "DeepSpeedStrategy")


def forgetting_monitors(trainer: pl.Trainer) -> list[Callback]:
    """The callbacks of ``trainer`` that report whether the model is within its forgetting limits."""
    return [cb for cb in trainer.callbacks if callable(getattr(cb, "within_limits", None))]  # type: ignore[union-attr]


class MergeAdapters(Callback):
    """Export the model with its adapters merged when ``fit`` ends (on global rank 0).

    Args:
        dirpath: the output directory; relative paths are taken under the Trainer's ``default_root_dir``.
        model_attr: the LightningModule attribute holding the model (``""``: the module itself).
        quantized: for 4-bit bases, ``"dequantize"`` (a dense model) or ``"requantize"`` (a 4-bit model; each layer's
            error is in :attr:`report`).
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"``, or None to keep each tensor's dtype.
        max_shard_size: the largest output shard, e.g. ``"5GB"``.
        source_dir: the directory whose tokenizer and other non-weight files are copied (default: the model's
            ``config._name_or_path`` when it is a directory).
        overwrite: replace an existing output directory (otherwise an existing one is an error at the end of fit).
        only_within_limits: merge only if every callback with ``within_limits()`` returns True.

    After ``fit``: :attr:`report` (what was written) or :attr:`skipped` (why nothing was).

    Example::

        merge = MergeAdapters("merged", dtype="bfloat16", only_within_limits=True)
        trainer = L.Trainer(callbacks=[LoRA(r=16), ForgettingMonitor(...), merge])
        trainer.fit(module)
        print(merge.report or merge.skipped)
    """

    def __init__(
        self,
        dirpath: str = "merged",
        model_attr: str = "model",
        quantized: Literal["dequantize", "requantize"] = "dequantize",
        dtype: str | None = None,
        max_shard_size: int | str = "5GB",
        source_dir: str | None = None,
        overwrite: bool = False,
        only_within_limits: bool = False,
    ) -> None:
        if dtype is not None and dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r} must be one of {sorted(_DTYPES)} or None (each tensor's own dtype).")
        if quantized not in ("dequantize", "requantize"):
            raise ValueError(f"quantized={quantized!r} must be 'dequantize' or 'requantize'.")
        self.dirpath = dirpath
        self.model_attr = model_attr
        self.quantized = quantized
        self.dtype = dtype
        self.max_shard_size = max_shard_size
        self.source_dir = source_dir
        self.overwrite = overwrite
        self.only_within_limits = only_within_limits
        self.report: ExportReport | None = None
        self.skipped: str | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        strategy = type(trainer.strategy).__name__
        if strategy in _SHARDED_STRATEGIES:
            raise ValueError(
                f"MergeAdapters exports one process's full copy of the model, but under {strategy} each process holds "
                "a shard. Save the adapter with SaveAdapter and merge it with `zenft merge --base DIR --adapters "
                "ADAPTER --out DIR`, or remove MergeAdapters from the callbacks."
            )
        if self.only_within_limits and not forgetting_monitors(trainer):
            raise ValueError(
                "MergeAdapters(only_within_limits=True) needs a forgetting monitor in the same Trainer (a callback "
                "with a within_limits() method, such as ForgettingMonitor); add one, or set only_within_limits=False."
            )

    @override
    @rank_zero_only
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.only_within_limits:
            outside = [type(cb).__name__ for cb in forgetting_monitors(trainer) if not cb.within_limits()]  # type: ignore[attr-defined]
            if outside:
                self.skipped = f"{', '.join(outside)} reported the model outside its forgetting limits"
                rank_zero_warn(f"MergeAdapters: not merging: {self.skipped}.")
                return
        model = pl_module.get_submodule(self.model_attr) if self.model_attr else pl_module
        path = Path(self.dirpath)
        if not path.is_absolute():
            path = Path(trainer.default_root_dir) / path
        self.report = export_merged(
            model,
            path,
            quantized=self.quantized,
            dtype=_DTYPES[self.dtype] if self.dtype else None,
            max_shard_size=self.max_shard_size,
            source_dir=self.source_dir,
            overwrite=self.overwrite,
        )
        print(f"merged model saved to {path}")

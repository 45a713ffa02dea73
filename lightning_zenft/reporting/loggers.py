"""Sending the monitor's numbers, tables, images and files to whatever Lightning loggers the Trainer has.

* scalars go to every logger (``log_metrics``);
* tables go to W&B (``WandbLogger.log_table``);
* images go to W&B (``WandbLogger.log_image``) and TensorBoard (``SummaryWriter.add_image``);
* files (the adapter) go to W&B as an artifact.

Lightning's loggers log from global rank 0 only; call these on every rank or on rank 0, it is the same.

Example::

    log_scalars(trainer.loggers, {"forgetting/general/accuracy": 31.2}, step=trainer.global_step)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger


def require_wandb() -> Any:
    """Import wandb, or say how to install it."""
    try:
        import wandb
    except ImportError as err:
        raise ImportError(
            "Logging to Weights & Biases needs the wandb package: `pip install wandb` (or "
            "`pip install lightning_zenft[wandb]`)."
        ) from err
    return wandb


def log_scalars(loggers: Sequence[Logger], metrics: dict[str, float], step: int) -> None:
    """``metrics`` to every logger at ``step``."""
    for logger in loggers:
        logger.log_metrics(metrics, step=step)


def takes_tables(loggers: Sequence[Logger]) -> bool:
    """Whether a logger here shows tables (W&B)."""
    return any(isinstance(logger, WandbLogger) for logger in loggers)


def takes_images(loggers: Sequence[Logger]) -> bool:
    """Whether a logger here shows images (W&B, TensorBoard)."""
    return any(isinstance(logger, (WandbLogger, TensorBoardLogger)) for logger in loggers)


def log_table(loggers: Sequence[Logger], key: str, columns: list[str], rows: list[list[Any]], step: int) -> int:
    """The table to each W&B logger; returns how many took it."""
    count = 0
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            require_wandb()
            logger.log_table(key=key, columns=columns, data=rows, step=step)
            count += 1
    return count


def log_image(loggers: Sequence[Logger], key: str, rgb: np.ndarray, step: int) -> int:
    """An ``(H, W, 3)`` uint8 image to each W&B and TensorBoard logger; returns how many took it."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {rgb.shape} {rgb.dtype}.")
    count = 0
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            require_wandb()
            logger.log_image(key=key, images=[rgb], step=step)
            count += 1
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, rgb, global_step=step, dataformats="HWC")
            count += 1
    return count


def log_artifact(
    loggers: Sequence[Logger],
    directory: str | Path,
    name: str,
    kind: str = "model",
    metadata: dict[str, Any] | None = None,
) -> list[Any]:
    """Every file of ``directory`` as a W&B artifact on each W&B logger's run; returns the logged artifacts."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"artifact directory {str(directory)!r} does not exist.")
    artifacts = []
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            wandb = require_wandb()
            artifact = wandb.Artifact(name=name, type=kind, metadata=dict(metadata or {}))
            artifact.add_dir(str(directory))
            logger.experiment.log_artifact(artifact)
            artifacts.append(artifact)
    return artifacts


__all__ = ["log_artifact", "log_image", "log_scalars", "log_table", "require_wandb", "takes_images", "takes_tables"]

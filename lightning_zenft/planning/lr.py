"""Learning-rate range test centred on a recommended learning rate.

The recommendation (:func:`~lightning_zenft.planning.recommend.lora_learning_rate` or
:func:`~lightning_zenft.planning.recommend.full_learning_rate`) gives a good starting point; Lightning's
learning-rate finder then sweeps ``[lr / span, lr * span]`` exponentially on the real model and data and
suggests the rate at the steepest loss descent. Centring the sweep on the recommendation keeps the search
short: the default span of 10 covers two decades.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from lightning.pytorch.tuner.lr_finder import _LRFinder

    from lightning_zenft.planning.recommend import Recommendation

__all__ = ["lr_find_from_recommendation"]

_LR_ATTRS = ("learning_rate", "lr")


def _module_learning_rate(module: pl.LightningModule) -> float | None:
    for name in _LR_ATTRS:
        value = getattr(module, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    hparams = getattr(module, "hparams", {})
    for name in _LR_ATTRS:
        value = hparams.get(name) if hasattr(hparams, "get") else None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def lr_find_from_recommendation(
    trainer: pl.Trainer,
    module: pl.LightningModule,
    datamodule: pl.LightningDataModule | None = None,
    learning_rate: float | Recommendation | None = None,
    span: float = 10.0,
    **kwargs: Any,
) -> tuple[float, _LRFinder]:
    """Run Lightning's learning-rate finder over ``[lr / span, lr * span]`` around a recommended rate.

    Args:
        trainer: the Trainer to sweep with (its settings, e.g. precision and devices, are used as is).
        module: the LightningModule to tune.
        datamodule: optional datamodule; dataloaders can go through ``kwargs`` (``train_dataloaders=``).
        learning_rate: the centre of the sweep: a float or a :class:`Recommendation`; ``None`` reads the
            module's ``learning_rate`` or ``lr`` attribute (or hyperparameter).
        span: the sweep covers ``[lr / span, lr * span]``; must be greater than 1.
        kwargs: passed to ``Tuner.lr_find`` (``num_training``, ``mode``, ``early_stop_threshold``,
            ``update_attr``, ``attr_name``...). ``update_attr`` defaults to ``True`` when the module has a
            ``learning_rate``/``lr`` attribute or hyperparameter, so the suggestion is written back, and to
            ``False`` when it has none.

    Returns:
        ``(suggested_lr, lr_finder)``. When the finder cannot suggest a rate (too few points) the centre is
        returned with a warning.

    Example::

        >>> rec = recommend("1.1B", "instruction-simple", 20_000)  # doctest: +SKIP
        >>> lr, finder = lr_find_from_recommendation(trainer, module, dm, rec, num_training=50)  # doctest: +SKIP
        >>> finder.plot(suggest=True)  # doctest: +SKIP
    """
    from lightning.pytorch.tuner import Tuner

    if learning_rate is None:
        centre = _module_learning_rate(module)
        if centre is None:
            raise ValueError(
                f"No learning rate given and {type(module).__name__} has no numeric `learning_rate` or `lr` "
                "attribute or hyperparameter. Pass learning_rate= (a float or a Recommendation)."
            )
    elif isinstance(learning_rate, (int, float)) and not isinstance(learning_rate, bool):
        centre = float(learning_rate)
    elif hasattr(learning_rate, "learning_rate"):
        centre = float(learning_rate.learning_rate)
    else:
        raise TypeError(
            f"learning_rate={learning_rate!r} is neither a number nor a Recommendation. Pass a float such as 2e-4."
        )
    problems = []
    if not centre > 0:
        problems.append(f"learning rate {centre!r} (must be positive)")
    if not span > 1:
        problems.append(f"span={span!r} (must be greater than 1: the sweep is [lr / span, lr * span])")
    for key in ("min_lr", "max_lr"):
        if key in kwargs:
            problems.append(f"{key}={kwargs[key]!r} (set by the recommendation and span; change span instead)")
    if problems:
        raise ValueError("Invalid learning-rate sweep: " + "; ".join(problems) + ".")
    kwargs.setdefault("update_attr", _module_learning_rate(module) is not None)

    finder = Tuner(trainer).lr_find(module, datamodule=datamodule, min_lr=centre / span, max_lr=centre * span, **kwargs)
    if finder is None:
        raise RuntimeError(
            "The learning-rate finder did not run (the Trainer has fast_dev_run set). Build the Trainer without "
            "fast_dev_run to sweep."
        )
    suggestion = finder.suggestion()
    if suggestion is None:
        warnings.warn(
            f"The learning-rate finder could not suggest a rate from {len(finder.results.get('lr', []))} points; "
            f"returning the recommendation {centre:g}. Raise num_training for a usable curve.",
            stacklevel=2,
        )
        return centre, finder
    return float(suggestion), finder

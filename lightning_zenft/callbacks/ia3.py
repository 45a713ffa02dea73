"""The ``IA3`` callback: (IA)^3 scaling vectors injected into any LightningModule (see
:mod:`lightning_zenft.callbacks._adapter` for what every adapter callback does and when).

Example::

    trainer = L.Trainer(callbacks=[IA3()])      # keys, values and the FFN down projection
"""

from __future__ import annotations

from lightning_zenft.callbacks._adapter import AdapterCallback
from lightning_zenft.config import IA3Config


class IA3(AdapterCallback):
    """(IA)^3 (Liu et al. 2022) on the target layers of the LightningModule, injected at ``setup``: a learned vector
    scales each target's output, or the input of the feed-forward ones (:mod:`lightning_zenft.adapters.ia3`).

    Args:
        target_modules: the layers that get a vector; by default the key/value projections and the feed-forward down
            projection (``config.IA3_TARGET_MODULES``); or a preset, a list of names/suffixes or a regex.
        feedforward_modules: the targets that scale their input; a list must be a subset of a ``target_modules``
            list; None: the down projections (``config.IA3_FEEDFORWARD_MODULES``).
        init_ia3_weights: start the vectors at ones (the base model).
        exclude_modules: layers to skip (names/suffixes or a regex).
        trainable_norms: also train normalization layers.
        modules_to_save: modules trained in full (e.g. a new classification head).
        bias: must stay ``"none"`` (PEFT's IA3 format has no bias setting).
        save_full_state_dict: keep the frozen base in Lightning checkpoints too.

    Example::

        trainer = L.Trainer(callbacks=[IA3(), SaveAdapter("out/ia3")])
        trainer.fit(module)            # out/ia3 loads with PeftModel.from_pretrained(base, "out/ia3")
    """

    config_cls = IA3Config
    config: IA3Config


__all__ = ["IA3"]

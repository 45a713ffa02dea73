"""The ``BitFit`` callback: only the model's biases train (and, as options, norms, the head or chosen blocks); nothing
is injected (see :mod:`lightning_zenft.callbacks._adapter` for what every adapter callback does and when).

Example::

    trainer = L.Trainer(callbacks=[BitFit(), SaveAdapter("out/bitfit")])
"""

from __future__ import annotations

from lightning_zenft.callbacks._adapter import AdapterCallback
from lightning_zenft.config import BitFitConfig


class BitFit(AdapterCallback):
    """BitFit (Ben Zaken et al. 2022, "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based Masked
    Language-models"): the model is frozen except its bias terms, at ``setup``.

    Options widen what trains to the "selected layers" family: norms, the output head, or chosen transformer blocks
    by depth (``blocks``) and type (``block_parts``). The trainable share is logged like every adapter callback's;
    checkpoints and ``save_adapter(model, dir, method="bitfit")`` (or ``SaveAdapter``) hold only what trained. A model
    without biases (Llama-style) and no other option is an error: BitFit would train nothing.

    Args:
        bias: ``"all"`` (every bias trains) or ``"none"`` (only what the options below select).
        train_head: also train the output head (a tied head trains the input embedding too).
        blocks: blocks that train in full: ``"all"``, ``"first:K"``, ``"last:K"`` or a list of indices (negative
            from the end).
        block_parts: what of each chosen block trains: ``"all"``, ``"attention"`` or ``"mlp"``.
        trainable_norms: also train normalization layers.
        modules_to_save: modules trained in full, by name suffix.
        target_modules, exclude_modules: not used (BitFit adds no modules); anything but the defaults is an error.
        save_full_state_dict: keep the frozen base in Lightning checkpoints too.

    Example::

        trainer = L.Trainer(callbacks=[BitFit()])                                   # GPT-2, BERT...: biases only
        trainer = L.Trainer(callbacks=[BitFit(bias="none", blocks="last:2", block_parts="mlp")])   # Llama
    """

    config_cls = BitFitConfig
    config: BitFitConfig


__all__ = ["BitFit"]

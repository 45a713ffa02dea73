"""The ``LoReFT`` callback: low-rank representation fine-tuning on the outputs of transformer blocks (see
:mod:`lightning_zenft.adapters.reft` for the formula, the positions and generation, and
:mod:`lightning_zenft.callbacks._adapter` for what every adapter callback does and when).

Example::

    trainer = L.Trainer(callbacks=[LoReFT(r=4, first_positions=1, last_positions=1)])
"""

from __future__ import annotations

from lightning_zenft.callbacks._adapter import AdapterCallback
from lightning_zenft.config import LoReFTConfig


class LoReFT(AdapterCallback):
    """LoReFT interventions ``h + R^T (W h + b - R h)`` on the hidden states of chosen blocks, at the first and last
    real tokens of each sequence, injected at ``setup``. ``R`` has orthonormal rows, kept so by a parametrization.
    Saved in this library's own adapter format (HF PEFT has no such method).

    Args:
        r: rank of the intervention (at most the hidden size).
        first_positions: intervene on the first this many real tokens of each sequence (the attention mask says which
            tokens are real).
        last_positions: intervene on the last this many real tokens of each sequence.
        dropout: dropout on the edit.
        target_modules: ``"all"`` blocks (the default), a list of block names or suffixes (``["layers.2"]``), or a
            regex over full names.
        exclude_modules: blocks to skip (names/suffixes or a regex).
        bias: which biases also train: ``"none"`` or ``"all"``.
        trainable_norms: also train normalization layers.
        modules_to_save: modules trained in full.
        save_full_state_dict: keep the frozen base in Lightning checkpoints too.

    Example::

        trainer = L.Trainer(callbacks=[LoReFT(r=4, first_positions=3, last_positions=3)])
        trainer.fit(module)
        save_adapter(module.model, "out/reft")
    """

    config_cls = LoReFTConfig


__all__ = ["LoReFT"]

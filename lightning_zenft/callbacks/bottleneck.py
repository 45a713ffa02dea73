"""The ``BottleneckAdapter`` (serial, Houlsby et al. 2019) and ``ParallelAdapter`` (He et al. 2022) callbacks: adapters
on whole attention and feed-forward modules (see :mod:`lightning_zenft.adapters.bottleneck` for the formulas and
:mod:`lightning_zenft.callbacks._adapter` for what every adapter callback does and when).

Example::

    trainer = L.Trainer(callbacks=[BottleneckAdapter(reduction_factor=16)])
"""

from __future__ import annotations

from lightning_zenft.callbacks._adapter import AdapterCallback
from lightning_zenft.config import BottleneckConfig, ParallelAdapterConfig


class BottleneckAdapter(AdapterCallback):
    """Serial bottleneck adapters ``h + up(act(down(h)))`` after the attention and feed-forward modules, injected at
    ``setup``. Not mergeable; saved in this library's own adapter format (HF PEFT has no such method).

    Args:
        reduction_factor: bottleneck size = the module's output width / this (it must divide it); None: 16 unless
            ``bottleneck_size`` is given.
        bottleneck_size: the bottleneck size itself (instead of ``reduction_factor``).
        non_linearity: ``"gelu"`` (default), ``"relu"``, ``"silu"`` or ``"tanh"``.
        dropout: dropout on the bottleneck's activations.
        target_modules: ``"all"`` (attention and feed-forward, the default), ``"attention"``, ``"mlp"``, a list of
            module names or suffixes, or a regex over full names.
        exclude_modules: modules to skip (names/suffixes or a regex).
        bias: which biases also train: ``"none"`` or ``"all"``.
        trainable_norms: also train normalization layers (Houlsby et al. do).
        modules_to_save: modules trained in full (e.g. a new classification head).
        save_full_state_dict: keep the frozen base in Lightning checkpoints too.

    Example::

        trainer = L.Trainer(callbacks=[BottleneckAdapter(bottleneck_size=64, trainable_norms=True)])
        trainer.fit(module)
        save_adapter(module.model, "out/adapter")
    """

    config_cls = BottleneckConfig


class ParallelAdapter(AdapterCallback):
    """Parallel adapters ``f(x) + s * up(act(down(x)))`` beside the feed-forward modules (or attention), injected at
    ``setup``. Not mergeable; saved in this library's own adapter format (HF PEFT has no such method).

    Args:
        reduction_factor: bottleneck size = the module's output width / this (it must divide it); None: 16 unless
            ``bottleneck_size`` is given.
        bottleneck_size: the bottleneck size itself (instead of ``reduction_factor``).
        scaling: the scale ``s`` of the adapter's output (4.0, as He et al.).
        non_linearity: ``"relu"`` (default), ``"gelu"``, ``"silu"`` or ``"tanh"``.
        dropout: dropout on the bottleneck's activations.
        target_modules: ``"mlp"`` (the default), ``"attention"``, ``"all"``, a list of module names or suffixes, or a
            regex over full names.
        exclude_modules: modules to skip (names/suffixes or a regex).
        bias: which biases also train: ``"none"`` or ``"all"``.
        trainable_norms: also train normalization layers.
        modules_to_save: modules trained in full.
        save_full_state_dict: keep the frozen base in Lightning checkpoints too.

    Example::

        trainer = L.Trainer(callbacks=[ParallelAdapter(bottleneck_size=64, scaling=4.0)])
    """

    config_cls = ParallelAdapterConfig


__all__ = ["BottleneckAdapter", "ParallelAdapter"]

"""The ``MAMAdapter`` callback: a parallel adapter on the feed-forward modules plus prefix tuning (He et al. 2022),
built from those two methods (see :class:`~lightning_zenft.config.MAMConfig`).

Example::

    trainer = L.Trainer(callbacks=[MAMAdapter(num_virtual_tokens=30, bottleneck_size=64)])
"""

from __future__ import annotations

from lightning_zenft.callbacks._adapter import AdapterCallback
from lightning_zenft.config import MAMConfig


class MAMAdapter(AdapterCallback):
    """MAM ("mix-and-match") adapters, injected at ``setup``: prefix tuning on every attention layer and a parallel
    adapter beside the feed-forward modules. Not mergeable (neither part is); saved in this library's own adapter
    format (HF PEFT has no such method).

    Args:
        num_virtual_tokens: prefix length (30, as the paper's MAM).
        prefix_projection: train the prefix through the reparametrization MLP.
        encoder_hidden_size: hidden size of that MLP.
        reduction_factor: the parallel adapter's bottleneck = module width / this (None: 16).
        bottleneck_size: the parallel adapter's bottleneck size itself.
        non_linearity: ``"relu"`` (default), ``"gelu"``, ``"silu"`` or ``"tanh"``.
        scaling: the scale of the parallel adapter's output (4.0).
        dropout: dropout on the parallel adapter's bottleneck activations.
        target_modules: where the parallel adapter goes (``"mlp"``, the default; names or a regex).
        exclude_modules, bias, trainable_norms, modules_to_save: as for ``ParallelAdapter``.
        save_full_state_dict: keep the frozen base in Lightning checkpoints too.

    Example::

        trainer = L.Trainer(callbacks=[MAMAdapter(bottleneck_size=64)])
        trainer.fit(module)
        save_adapter(module.model, "out/mam")
    """

    config_cls = MAMConfig

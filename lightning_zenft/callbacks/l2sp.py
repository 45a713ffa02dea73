r"""``L2SP``: a pull toward the starting weights, as a callback.

Li et al. 2018, "Explicit Inductive Bias for Transfer Learning with Convolutional Networks" (arXiv:1802.01483):

.. math::  \Omega = \frac{\lambda}{2} \lVert \theta - \theta^* \rVert^2

with ``theta*`` the weights at fit start. Unlike weight decay (a pull toward zero) it keeps the pretrained solution
as the reference. With LoRA the change of each adapted layer's effective weight is ``s B A`` and the penalty is
``strength / 2 * ||s B A||_F^2``, computed from ``r x r`` products (``s^2 <B^T B, A A^T>``) without forming the dense
change. The gradient is added in ``on_before_optimizer_step``; see
:class:`~lightning_zenft.callbacks._weight_penalty.WeightPenalty` for what it acts on, logging, sharding and
checkpoints. Cheaper than EWC (no Fisher, one anchor), weaker: every direction is held equally, the ones the general
task does not use as much as the ones it needs.
"""

from __future__ import annotations

from lightning_zenft.callbacks._weight_penalty import WeightPenalty


class L2SP(WeightPenalty):
    """``strength / 2 * ||theta - theta*||^2`` toward the weights at fit start, added to the gradients.

    Args:
        strength: ``lambda`` (> 0); the penalty's gradient is ``strength * (theta - theta*)``.
        name: metric prefix and state key (``"l2sp"``).

    Example::

        trainer = L.Trainer(callbacks=[L2SP(strength=0.1)])
        trainer.fit(module, datamodule)
    """

    kind = "l2sp"

    def __init__(self, strength: float = 0.1, name: str | None = None) -> None:
        super().__init__(strength, name)


__all__ = ["L2SP"]

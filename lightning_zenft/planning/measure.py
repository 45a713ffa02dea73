"""Measured activation memory: the bytes autograd saves for backward, on any device.

Each storage is counted once (by its address) and parameters are left out, so the figure is what a training step
holds between forward and backward. It does not depend on the device: the same tensors are saved on CPU and GPU.

Example::

    loss, saved = saved_activation_bytes(model, ids)   # forward with labels=ids; call loss.backward() after
"""

from __future__ import annotations

import torch
from torch import nn


def saved_activation_bytes(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Run ``model(input_ids=ids, labels=ids)``; return the loss and the unique non-parameter bytes saved."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_ptrs:
            saved.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    return loss, sum(saved.values())

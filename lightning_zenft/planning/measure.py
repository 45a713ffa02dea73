"""Measured activation memory: the bytes the autograd graph holds for backward when forward ends, on any device.

Every tensor autograd saves goes through a ``saved_tensors_hooks`` pack hook that wraps it in a small handle; the
graph keeps the handle for as long as it keeps the saved tensor. When forward returns, the handles still alive are
exactly the saved tensors of the graph that backward will run: a graph built and dropped inside forward (HF PEFT's
DoRA passes ``torch.eye(in)`` through ``lora_A`` to form ``B A`` for its weight norm, then keeps only the norm) has
released its handles and is not counted, and a freed storage whose address is reused cannot hide a live one. The
live tensors' storages are counted once each (a view and its base share one), parameters left out. This is what a
training step holds between forward and backward. It does not depend on the device: the same tensors are saved on
CPU and GPU.

Example::

    loss, saved = saved_activation_bytes(model, ids)   # forward with labels=ids; call loss.backward() after
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable, Iterable
from typing import TypeVar

import torch
from torch import nn

__all__ = ["saved_activation_bytes", "saved_tensor_bytes"]

T = TypeVar("T")


class _Held:
    """What the graph stores in place of a saved tensor; alive exactly as long as the graph keeps the tensor."""

    __slots__ = ("__weakref__", "tensor")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


def saved_tensor_bytes(forward: Callable[[], T], exclude: Iterable[torch.Tensor] = ()) -> tuple[T, int]:
    """Run ``forward()``; return its result and the bytes of the unique storages its autograd graph holds for backward
    when it returns, leaving out the storages of ``exclude`` (weights that exist anyway).

    Example:
        >>> w = torch.ones(1000, requires_grad=True)
        >>> _, held = saved_tensor_bytes(lambda: w.exp().sum(), exclude=[w])  # exp keeps its output
        >>> held
        4000
    """
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    handles: list[weakref.ref[_Held]] = []

    def pack(tensor: torch.Tensor) -> _Held:
        held = _Held(tensor.detach())  # the same storage without its grad_fn: no cycle through a saved output
        handles.append(weakref.ref(held))
        return held

    def unpack(held: _Held) -> torch.Tensor:
        return held.tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        result = forward()
    gc.collect()  # graphs dropped inside forward but kept alive by a reference cycle
    held_storages: dict[int, int] = {}
    for ref in handles:
        held = ref()
        if held is None:
            continue  # its graph was freed before forward ended
        storage = held.tensor.untyped_storage()
        if storage.nbytes() and storage.data_ptr() not in excluded:
            held_storages[storage.data_ptr()] = storage.nbytes()  # live storages have distinct addresses
    return result, sum(held_storages.values())


def saved_activation_bytes(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Run ``model(input_ids=ids, labels=ids)``; return the loss and the bytes of the unique non-parameter storages
    its graph holds for backward when forward ends.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        ...                                      num_attention_heads=2, vocab_size=64))
        >>> loss, saved = saved_activation_bytes(model, torch.randint(0, 64, (1, 8)))
        >>> saved > 0
        True
    """
    return saved_tensor_bytes(lambda: model(input_ids=ids, labels=ids).loss, exclude=model.parameters())

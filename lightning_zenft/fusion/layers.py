"""Adapter layers on the fused kernels: the per-layer level of :func:`~lightning_zenft.fusion.fuse_lora_layers`.

A fusable layer becomes its fused twin by swapping its ``__class__`` to a subclass whose forward calls a fused kernel:
same object, same parameters, same ``state_dict`` keys. :data:`FUSED_CLASSES` is the one table saying which adapter
class has which fused twin (a method with a fused kernel adds one line there); nothing else in the package tests
for concrete adapter classes.

* :class:`FusedLoRALinear`: :func:`~lightning_zenft.kernels.fused_lora` (dense, bitsandbytes NF4, or any base with
  ``dequantize_weight()``); siblings reading one input may share one call (:mod:`~lightning_zenft.fusion.groups`).
* :class:`FusedDoRALinear`: :func:`~lightning_zenft.kernels.fused_dora`. With dropout, DoRA needs a second base
  product (of the input's dropped-out part), as in HF PEFT; the fused function regenerates the mask in backward
  from a seed instead of keeping it.

Each fused layer keeps the :class:`~lightning_zenft.kernels.runtime.KernelRuntime` it was fused with (the
``FusedKernels`` callback's) and passes it to every kernel call.

Example::

    fuse_lora_layers(model)                      # LoRALinear -> FusedLoRALinear, DoRALinear -> FusedDoRALinear
    isinstance(model.q_proj, LoRALinear)         # still True
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from lightning_zenft.adapters.dora import DoRALinear
from lightning_zenft.adapters.lora import LoRALinear
from lightning_zenft.fusion.sharding import is_dtensor
from lightning_zenft.fusion.weights import base_weight, compute_dtype, kernel_weight
from lightning_zenft.kernels.dora import fused_dora
from lightning_zenft.kernels.lora import LoRAProjection, fused_lora_group
from lightning_zenft.kernels.runtime import KernelRuntime, resolve

_RUNTIME = "_zenft_runtime"  # instance attribute (not a module attribute): the runtime a fused layer runs with


def layer_runtime(layer: nn.Module) -> KernelRuntime:
    """The kernel runtime ``layer`` was fused with (the default runtime if none)."""
    return resolve(layer.__dict__.get(_RUNTIME))


class FusedLoRALinear(LoRALinear):
    """A :class:`LoRALinear` whose forward runs the fused kernel. Made by ``fuse_lora_layers``, never built.

    The class is swapped on the existing object (``layer.__class__ = FusedLoRALinear``), so parameters, buffers and
    ``state_dict`` keys are those of the LoRALinear; ``unfuse_lora_layers`` swaps it back.

    Example::

        fuse_lora_layers(model)
        isinstance(model.q_proj, FusedLoRALinear)    # True; still a LoRALinear
    """

    def projection(self, dtype: torch.dtype) -> LoRAProjection:
        """This layer as a :class:`~lightning_zenft.kernels.LoRAProjection` in ``dtype``."""
        weight = kernel_weight(self.base_layer, dtype, layer_runtime(self))
        bias = getattr(self.base_layer, "bias", None)
        p = self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) else 0.0
        return LoRAProjection(weight, bias, self.lora_A.weight, self.lora_B.weight, self.scaling, p)

    def fused_active(self) -> bool:
        """Whether the next forward uses the kernel (not merged, not disabled)."""
        return not (self.merged or self.disabled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fused_active() or _sharded_now(self):
            return super().forward(x)
        group = self.__dict__.get("_zenft_group")
        if group is not None:
            return group(self, x)
        return self.forward_alone(x)

    def forward_alone(self, x: torch.Tensor) -> torch.Tensor:
        """This layer's fused kernel on its own (outside any shared-input group)."""
        dtype = compute_dtype(x)
        return fused_lora_group(x.to(dtype), [self.projection(dtype)], self.training, layer_runtime(self))[0]


class FusedDoRALinear(DoRALinear):
    """A :class:`DoRALinear` whose forward runs the fused DoRA kernel. Made by ``fuse_lora_layers``, never built."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled or _sharded_now(self):
            return super().forward(x)
        dtype = compute_dtype(x)
        runtime = layer_runtime(self)
        weight = kernel_weight(self.base_layer, dtype, runtime)
        bias = getattr(self.base_layer, "bias", None)
        p = self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) else 0.0
        a, b, m = self.lora_A.weight, self.lora_B.weight, self.lora_magnitude_vector
        return fused_dora(
            x.to(dtype), weight, a, b, m, self.scaling, bias, dropout=p, training=self.training, runtime=runtime
        )


def _sharded_now(layer: nn.Module) -> bool:
    """True when the layer's parameters are ``DTensor`` shards during its forward (tensor parallelism, or a forward
    outside its FSDP2 unit): the kernels take whole tensors, so the plain forward runs, with a warning once."""
    if not (is_dtensor(layer.lora_A.weight) or is_dtensor(getattr(layer.base_layer, "weight", None))):
        return False
    if not layer.__dict__.get("_zenft_dtensor_warned"):
        layer.__dict__["_zenft_dtensor_warned"] = True
        warnings.warn(
            f"fused LoRA: a {type(layer).__name__} runs its unfused forward: its parameters are sharded DTensors "
            "during the forward (tensor parallelism, or a call outside its FSDP2 unit); the fused kernel takes whole "
            "tensors.",
            stacklevel=3,
        )
    return True


FUSED_CLASSES: dict[type[nn.Module], type[nn.Module]] = {LoRALinear: FusedLoRALinear, DoRALinear: FusedDoRALinear}
"""Adapter class -> its fused twin (a subclass with the same parameters and a fused forward)."""
_PLAIN_CLASSES = {fused: plain for plain, fused in FUSED_CLASSES.items()}


def is_fused(layer: nn.Module) -> bool:
    """True for a layer running a fused kernel (a fused twin from :data:`FUSED_CLASSES`)."""
    return type(layer) in _PLAIN_CLASSES


def has_fused_twin(layer: nn.Module) -> bool:
    """True for an adapter layer that has a fused twin, fused already or not."""
    return type(layer) in FUSED_CLASSES or type(layer) in _PLAIN_CLASSES


def fuse_layer(layer: nn.Module, runtime: KernelRuntime) -> None:
    """Swap ``layer`` to its fused twin running with ``runtime`` (check :func:`unfusable_reason` first)."""
    if type(layer) in FUSED_CLASSES:
        layer.__class__ = FUSED_CLASSES[type(layer)]
    layer.__dict__[_RUNTIME] = runtime


def unfuse_layer(layer: nn.Module) -> bool:
    """Swap a fused layer back to its plain class; returns whether it was fused."""
    plain = _PLAIN_CLASSES.get(type(layer))
    if plain is None:
        return False
    layer.__dict__.pop("_zenft_group", None)
    layer.__dict__.pop(_RUNTIME, None)
    layer.__class__ = plain
    return True


def unfusable_reason(layer: nn.Module, in_fsdp_unit: bool = False) -> str | None:
    """Why ``layer`` cannot run a fused kernel, or None when it can.

    ``in_fsdp_unit``: the layer is inside an FSDP2 unit, whose forward gathers its ``DTensor`` parameters into whole
    tensors (see :mod:`~lightning_zenft.fusion.sharding`); outside one, ``DTensor`` parameters stay sharded.
    """
    if not has_fused_twin(layer):
        return f"{type(layer).__name__} has no fused kernel (fused: {', '.join(c.__name__ for c in FUSED_CLASSES)})"
    dropout = getattr(layer, "lora_dropout", None)
    if not isinstance(dropout, (nn.Identity, nn.Dropout)):
        return f"its lora_dropout is a {type(dropout).__name__}, not nn.Dropout"
    if not in_fsdp_unit and any(is_dtensor(p) for p in layer.parameters()):
        return (
            "its parameters are DTensors outside any FSDP2 unit (tensor parallelism?), which stay sharded during the "
            "forward; the fused kernel takes whole tensors"
        )
    base = layer.base_layer
    weight = base_weight(base)
    if weight is None:
        return (
            f"its base layer {type(base).__name__} stores the weight in a form the kernel cannot read "
            "(supported: floating-point weights, bitsandbytes NF4, or a base with dequantize_weight())"
        )
    if isinstance(weight, torch.Tensor) and weight.requires_grad:
        return "its base weight requires grad (the fused kernel computes no base-weight gradient)"
    return None

"""Model patching for the fused kernels: which layers take which fused function, shared-input groups, gated MLPs,
and Liger's kernels. The kernels themselves (:mod:`lightning_zenft.kernels`) know no ``nn.Module``; this package
knows the model. The :class:`~lightning_zenft.FusedKernels` callback drives it.

Example::

    report = fuse_lora_layers(model, runtime=KernelRuntime())
    model(**batch)
    finalize_shared_inputs(model)
    ...
    unfuse_lora_layers(model)
"""

from lightning_zenft.fusion.groups import SharedInputGroup, finalize_shared_inputs, shared_input_groups
from lightning_zenft.fusion.layers import FUSED_CLASSES, FusedDoRALinear, FusedLoRALinear, unfusable_reason
from lightning_zenft.fusion.liger import LigerPatches, apply_liger, restore_liger
from lightning_zenft.fusion.mlp import FusedGatedMLPForward, GLUMLPForward, fuse_glu_mlps
from lightning_zenft.fusion.model import FusionReport, fuse_lora_layers, unfuse_lora_layers

__all__ = [
    "FUSED_CLASSES",
    "FusedDoRALinear",
    "FusedGatedMLPForward",
    "FusedLoRALinear",
    "FusionReport",
    "GLUMLPForward",
    "LigerPatches",
    "SharedInputGroup",
    "apply_liger",
    "finalize_shared_inputs",
    "fuse_glu_mlps",
    "fuse_lora_layers",
    "restore_liger",
    "shared_input_groups",
    "unfusable_reason",
    "unfuse_lora_layers",
]

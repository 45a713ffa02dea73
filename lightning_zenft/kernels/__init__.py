"""Fused kernels: LoRA projections (dense and NF4 bases), shared-input groups, gated MLPs, and their references.

Every kernel runs on any device: Triton on CUDA (or on CPU under ``TRITON_INTERPRET=1``), the same math in torch ops
elsewhere. Importing this package needs no Triton.

Example::

    from lightning_zenft.kernels import fused_lora
    y = fused_lora(x, base.weight, lora_a, lora_b, scaling=2.0, bias=base.bias)
"""

from lightning_zenft.kernels._triton import interpret_mode
from lightning_zenft.kernels.dora import fused_dora
from lightning_zenft.kernels.glu import GLUActivation, glu, glu_reference
from lightning_zenft.kernels.lora import (
    CallableWeight,
    FrozenWeight,
    LoRAProjection,
    dropout_mask,
    fused_lora,
    fused_lora_group,
    lora_reference,
)
from lightning_zenft.kernels.matmul import dual_lowrank, lowrank_matmul, matmul_choices, set_matmul_backend
from lightning_zenft.kernels.mlp import fused_lora_mlp
from lightning_zenft.kernels.nf4 import (
    NF4Weight,
    dequantize_nf4,
    dequantize_nf4_reference,
    quantize_nf4,
    release_nf4_buffers,
)
from lightning_zenft.kernels.runtime import set_triton_enabled, triton_enabled

__all__ = [
    "CallableWeight",
    "FrozenWeight",
    "GLUActivation",
    "LoRAProjection",
    "NF4Weight",
    "dequantize_nf4",
    "dequantize_nf4_reference",
    "dropout_mask",
    "dual_lowrank",
    "fused_dora",
    "fused_lora",
    "fused_lora_group",
    "fused_lora_mlp",
    "glu",
    "glu_reference",
    "interpret_mode",
    "lora_reference",
    "lowrank_matmul",
    "matmul_choices",
    "quantize_nf4",
    "release_nf4_buffers",
    "set_matmul_backend",
    "set_triton_enabled",
    "triton_enabled",
]

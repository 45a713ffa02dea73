r"""4-bit weights with bitsandbytes: the quantization spec, one weight, one layer.

QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv:2305.14314) stores each frozen
weight in blocks of ``beta`` (64) consecutive values of the row-major ``(out, in)`` matrix, as a 4-bit index into 16
levels times the block's absolute maximum:

.. math::  \hat w_j = c[q_j] \cdot a_{\lfloor j / \beta \rfloor}, \qquad a_b = \max_{j \in b} |w_j|

* ``nf4``: the levels ``c`` are quantiles of a standard normal (information-theoretically optimal for normally
  distributed weights); ``fp4``: a 4-bit float (1 sign, 2 exponent, 1 mantissa bit).
* ``-dq`` (double quantization): the float32 scales ``a`` are stored as 8-bit codes in blocks of 256 plus an offset,
  saving about 0.37 bits per parameter (0.5 -> 0.127) at a small extra error.

Weights are held by bitsandbytes' own ``Linear4bit``/``Params4bit`` (not a format of ours), so ``transformers``, PEFT
and :mod:`lightning_zenft.kernels` read them. The dequantized weight is produced in the compute dtype directly.

Example::

    spec = QuantSpec.from_mode("nf4-dq", compute_dtype=torch.bfloat16)
    layer4 = to_linear4bit(nn.Linear(128, 64), spec)       # a bitsandbytes Linear4bit
    w = dequantize(layer4.weight)                           # (64, 128) in bfloat16
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_zenft.precision._bnb import import_bitsandbytes

MODES = ("nf4", "nf4-dq", "fp4", "fp4-dq")
BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)
DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
}


def resolve_dtype(value: str | torch.dtype) -> torch.dtype:
    """A floating compute dtype from a ``torch.dtype`` or its name (``"bfloat16"``, ``"bf16"``, ``"float32"``...)."""
    if isinstance(value, torch.dtype):
        if value not in DTYPES.values():
            raise ValueError(
                f"compute_dtype={value} cannot compute a 4-bit layer; use one of bfloat16, float16, float32."
            )
        return value
    name = str(value).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"compute_dtype={value!r} is not one of {sorted(DTYPES)}.")
    return DTYPES[name]


@dataclass(frozen=True)
class QuantSpec:
    """How frozen weights are stored: 4-bit type, double quantization, block size, and the dtype layers compute in.

    Example::

        QuantSpec.from_mode("nf4", double_quant=True).mode     # 'nf4-dq'
    """

    quant_type: str = "nf4"
    """``"nf4"`` or ``"fp4"``."""
    double_quant: bool = False
    """Quantize the block scales too (8-bit, blocks of 256)."""
    blocksize: int = 64
    """Weights per scale."""
    compute_dtype: torch.dtype = torch.bfloat16
    """The dtype the 4-bit layers dequantize into and multiply in."""

    def __post_init__(self) -> None:
        problems = []
        if self.quant_type not in ("nf4", "fp4"):
            problems.append(f"quant_type={self.quant_type!r} must be 'nf4' or 'fp4'")
        if self.blocksize not in BLOCKSIZES:
            problems.append(f"blocksize={self.blocksize!r} must be one of {BLOCKSIZES} (what bitsandbytes implements)")
        if self.compute_dtype not in DTYPES.values():
            problems.append(f"compute_dtype={self.compute_dtype} must be bfloat16, float16 or float32")
        if problems:
            raise ValueError("invalid 4-bit quantization settings: " + "; ".join(problems) + ".")

    @property
    def mode(self) -> str:
        """``"nf4"``, ``"nf4-dq"``, ``"fp4"`` or ``"fp4-dq"``."""
        return self.quant_type + ("-dq" if self.double_quant else "")

    @classmethod
    def from_mode(
        cls,
        mode: str = "nf4",
        double_quant: bool | None = None,
        blocksize: int = 64,
        compute_dtype: str | torch.dtype = torch.bfloat16,
    ) -> QuantSpec:
        """A spec from a mode name; ``double_quant`` may repeat what the ``-dq`` suffix says, never contradict it."""
        if mode not in MODES:
            hint = " (8-bit is not offered: use 'nf4' or 'nf4-dq')" if "int8" in str(mode) else ""
            raise ValueError(f"mode={mode!r} is not one of {MODES}{hint}.")
        quant_type, _, dq = mode.partition("-")
        mode_dq = dq == "dq"
        if double_quant is not None and double_quant != mode_dq:
            raise ValueError(
                f"mode={mode!r} and double_quant={double_quant} disagree; use mode='{quant_type}-dq' (or "
                f"double_quant=True with mode='{quant_type}') for double quantization, mode='{quant_type}' without."
            )
        return cls(quant_type, mode_dq or bool(double_quant), int(blocksize), resolve_dtype(compute_dtype))

    def to_dict(self) -> dict[str, Any]:
        """A plain description, stored in checkpoints and compared on resume."""
        return {"mode": self.mode, "blocksize": self.blocksize, "compute_dtype": str(self.compute_dtype)}


def is_params4bit(tensor: Any) -> bool:
    """True for a quantized bitsandbytes ``Params4bit`` (one with its quant state)."""
    return type(tensor).__name__ == "Params4bit" and getattr(tensor, "quant_state", None) is not None


def quantize_weight(weight: torch.Tensor, spec: QuantSpec) -> nn.Parameter:
    """Quantize a dense ``(out, in)`` weight into a frozen bitsandbytes ``Params4bit`` on the weight's device."""
    bnb = import_bitsandbytes()
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(
            f"4-bit quantization takes a floating (out, in) weight; got {weight.dtype} {tuple(weight.shape)}."
        )
    packed, state = bnb.functional.quantize_4bit(
        weight.detach().contiguous(),
        blocksize=spec.blocksize,
        compress_statistics=spec.double_quant,
        quant_type=spec.quant_type,
        quant_storage=torch.uint8,
    )
    state.dtype = spec.compute_dtype  # dequantize straight into the compute dtype
    return bnb.nn.Params4bit(
        packed,
        requires_grad=False,
        quant_state=state,
        blocksize=spec.blocksize,
        compress_statistics=spec.double_quant,
        quant_type=spec.quant_type,
        quant_storage=torch.uint8,
        bnb_quantized=True,
    )


def dequantize(param: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense ``(out, in)`` weight of a ``Params4bit``, in ``dtype`` (default: its compute dtype).

    ``dtype=torch.float32`` gives the exact values ``c[q] * a`` (the compute dtype may round them).
    """
    bnb = import_bitsandbytes()
    if not is_params4bit(param):
        raise TypeError(f"expected a quantized bitsandbytes Params4bit, got {type(param).__name__}.")
    state = param.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        raise RuntimeError(
            "this Params4bit was repacked by bitsandbytes' CPU inference path; layers made by lightning_zenft "
            "turn that off (support_avx512bf16_for_cpu=False). Save and reload the layer to undo the repacking."
        )
    if dtype is not None and dtype != state.dtype:
        state = copy.copy(state)
        state.dtype = dtype
    return bnb.functional.dequantize_4bit(param.data, state)  # (out, in)


def spec_of(layer: nn.Module) -> QuantSpec:
    """The :class:`QuantSpec` a 4-bit layer was quantized with (read from its weight)."""
    weight = layer.weight
    state = getattr(weight, "quant_state", None)
    if state is None:
        raise TypeError(f"{type(layer).__name__} holds no quantized 4-bit weight.")
    compute_dtype = getattr(layer, "compute_dtype", None) or state.dtype
    return QuantSpec(state.quant_type, bool(state.nested), int(state.blocksize), compute_dtype)


def to_linear4bit(linear: nn.Module, spec: QuantSpec, weight: nn.Parameter | None = None) -> nn.Module:
    """A bitsandbytes ``Linear4bit`` computing what ``linear`` computes, with its weight in 4 bits.

    Args:
        linear: an ``nn.Linear`` (its bias Parameter is kept as it is, trainable or not).
        spec: the quantization.
        weight: an already quantized ``Params4bit`` to hold instead of quantizing ``linear.weight`` (LoftQ's base).
    """
    bnb = import_bitsandbytes()
    if weight is None:
        weight = quantize_weight(linear.weight, spec)
    layer = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=False,
        compute_dtype=spec.compute_dtype,
        compress_statistics=spec.double_quant,
        quant_type=spec.quant_type,
        quant_storage=torch.uint8,
        device="meta",
    )
    weight.module = layer
    layer.weight = weight
    layer.quant_state = weight.quant_state
    layer.bias = linear.bias
    # In CPU inference bitsandbytes repacks the weight in place into another layout; keep the standard one, which
    # checkpoints, the fused kernels and the checks here read.
    layer.support_avx512bf16_for_cpu = False
    layer.train(linear.training)
    return layer

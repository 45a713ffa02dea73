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
import math
from collections.abc import Iterable
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
        if double_quant is False and mode_dq:
            raise ValueError(
                f"mode={mode!r} and double_quant=False disagree; use mode='{quant_type}' for no double "
                f"quantization, mode='{quant_type}-dq' (or double_quant=True) for it."
            )
        return cls(quant_type, mode_dq or bool(double_quant), int(blocksize), resolve_dtype(compute_dtype))

    def to_dict(self) -> dict[str, Any]:
        """A plain description, stored in checkpoints and compared on resume."""
        return {"mode": self.mode, "blocksize": self.blocksize, "compute_dtype": str(self.compute_dtype)}


def is_params4bit(tensor: Any) -> bool:
    """True for a quantized bitsandbytes ``Params4bit`` (one with its quant state)."""
    return type(tensor).__name__ == "Params4bit" and getattr(tensor, "quant_state", None) is not None


CHUNK = 1 << 18
"""Weights quantized per bitsandbytes call (a multiple of every block size): bounds the temporaries of a big layer."""


def quantize_weight(weight: torch.Tensor, spec: QuantSpec, chunk: int = CHUNK) -> nn.Parameter:
    """Quantize a dense ``(out, in)`` weight into a frozen bitsandbytes ``Params4bit`` on the weight's device.

    A weight of more than ``chunk`` values is quantized ``chunk`` values at a time (blocks never straddle chunks, and
    double quantization runs once over all the scales), which gives exactly the codes and scales of one call with a
    fraction of its temporary memory.
    """
    bnb = import_bitsandbytes()
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(
            f"4-bit quantization takes a floating (out, in) weight; got {weight.dtype} {tuple(weight.shape)}."
        )
    if chunk % 4096 or chunk <= 0:
        raise ValueError(f"chunk={chunk} must be a positive multiple of 4096 (the largest block size).")
    weight = weight.detach().contiguous()
    if weight.numel() <= chunk:
        packed, state = bnb.functional.quantize_4bit(
            weight,
            blocksize=spec.blocksize,
            compress_statistics=spec.double_quant,
            quant_type=spec.quant_type,
            quant_storage=torch.uint8,
        )
        state.dtype = spec.compute_dtype  # dequantize straight into the compute dtype
        return _params4bit(bnb, packed, state, spec)
    return quantize_chunks(weight.reshape(-1).split(chunk), weight.shape, spec)


def _params4bit(bnb: Any, packed: torch.Tensor, state: Any, spec: QuantSpec) -> nn.Parameter:
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


def quantize_chunks(chunks: Iterable[torch.Tensor], shape: tuple[int, ...], spec: QuantSpec) -> nn.Parameter:
    """Quantize a weight given as consecutive flat chunks (each a multiple of 4096 values but the last): what one
    ``quantize_4bit`` call gives, holding one chunk at a time (the low-memory loader streams them from the file)."""
    bnb = import_bitsandbytes()
    numel = math.prod(shape)
    packed = None
    scales = []
    code = None
    start = 0
    for part in chunks:
        if start % 4096 or part.dim() != 1:
            raise ValueError(f"chunks must be flat and start at multiples of 4096 values; one starts at {start}.")
        if packed is None:
            packed = torch.empty(((numel + 1) // 2, 1), dtype=torch.uint8, device=part.device)
        codes, state = bnb.functional.quantize_4bit(
            part, blocksize=spec.blocksize, compress_statistics=False, quant_type=spec.quant_type
        )
        packed[start // 2 : start // 2 + codes.numel()] = codes.reshape(-1, 1)
        scales.append(state.absmax)
        code = state.code
        start += part.numel()
    if packed is None or start != numel:
        raise ValueError(f"the chunks hold {start} values; a weight of shape {tuple(shape)} has {numel}.")
    absmax = torch.cat(scales)  # (blocks,) float32
    common = dict(shape=torch.Size(shape), dtype=spec.compute_dtype, blocksize=spec.blocksize, code=code)
    if not spec.double_quant:
        state = bnb.functional.QuantState(absmax=absmax, quant_type=spec.quant_type, **common)
        return _params4bit(bnb, packed, state, spec)
    offset = absmax.mean()  # bitsandbytes' double quantization: 8-bit codes of absmax - mean, blocks of 256
    qabsmax, state2 = bnb.functional.quantize_blockwise(absmax - offset, blocksize=256)
    state = bnb.functional.QuantState(
        absmax=qabsmax, quant_type=spec.quant_type, offset=offset, state2=state2, **common
    )
    return _params4bit(bnb, packed, state, spec)


def _scales(state: Any) -> torch.Tensor:
    """The float32 block scales of a quant state, undoing double quantization."""
    if not state.nested:
        return state.absmax.float()
    outer = state.state2.absmax.float().repeat_interleave(state.state2.blocksize)[: state.absmax.numel()]
    return state.state2.code.float()[state.absmax.long()] * outer + float(state.offset)  # (blocks,)


def dequantize_reference(packed: torch.Tensor, state: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``c[q_j] * a_{j // blocksize}`` in plain PyTorch, for any shape and code table.

    bitsandbytes 0.50's CPU kernel gets some row widths wrong (16, 32, 48, 96 with blocksize 64, where blocks and rows
    do not line up); this is what CPU runs use.
    """
    numel = math.prod(state.shape)
    codes = packed.reshape(-1).view(torch.uint8)
    idx = torch.stack([codes >> 4, codes & 15], dim=-1).reshape(-1)[:numel].long()  # (numel,)
    scale = _scales(state).repeat_interleave(state.blocksize)[:numel]  # (numel,)
    return (state.code.float()[idx] * scale).to(dtype or state.dtype).view(tuple(state.shape))  # (out, in)


def dequantize(param: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense ``(out, in)`` weight of a ``Params4bit``, in ``dtype`` (default: its compute dtype).

    ``dtype=torch.float32`` gives the exact values ``c[q] * a`` (the compute dtype may round them). On CUDA this is
    bitsandbytes' kernel, elsewhere :func:`dequantize_reference`.
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
    if param.device.type == "cpu":
        return dequantize_reference(param.data, state, dtype)
    if dtype is not None and dtype != state.dtype:
        state = copy.copy(state)
        state.dtype = dtype
    return bnb.functional.dequantize_4bit(param.data, state)  # (out, in)


class Linear4bitFunction(torch.autograd.Function):
    """``x W^T`` for a frozen 4-bit ``W``: the dense weight is rebuilt in forward and again in backward, never kept.

    ``dense`` is called with the dtype to dequantize into; under FSDP2 the 4-bit storage it reads is gathered again
    before this layer's backward runs.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dense: Any) -> torch.Tensor:
        ctx.dense = dense
        return x @ dense(x.dtype).t()  # (..., out)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad @ ctx.dense(grad.dtype), None  # (..., in)


def linear_4bit(x: torch.Tensor, dense: Any, bias: torch.Tensor | None, compute_dtype: torch.dtype) -> torch.Tensor:
    """``x W^T + b`` computed in ``compute_dtype`` (``dense(dtype)`` gives ``W``), returned in ``x``'s dtype."""
    out = Linear4bitFunction.apply(x.to(compute_dtype), dense)  # (..., out)
    if bias is not None:
        out = out + bias.to(compute_dtype)
    return out.to(x.dtype)


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

    Returns:
        a :class:`~lightning_zenft.precision.linear4bit.FrozenLinear4bit` (a bitsandbytes ``Linear4bit``).
    """
    from lightning_zenft.precision.linear4bit import FrozenLinear4bit

    if weight is None:
        weight = quantize_weight(linear.weight, spec)
    layer = FrozenLinear4bit(linear.in_features, linear.out_features, spec)
    weight.module = layer
    layer.weight = weight
    layer.quant_state = weight.quant_state
    layer.bias = linear.bias
    layer.train(linear.training)
    return layer

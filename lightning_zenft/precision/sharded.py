r"""A 4-bit weight FSDP2 can shard: the bitsandbytes storage and quant state as one tensor subclass.

``fully_shard`` over a bitsandbytes ``Linear4bit`` shards the packed bytes as a plain tensor and drops the weight's
``quant_state``, so the layer cannot compute any more. :class:`Packed4bitTensor` holds what a ``Params4bit`` holds,
row-aligned, and presents itself as the dense ``(out, in)`` weight it stands for:

* ``packed``: ``uint8 (out, in / 2)``, two 4-bit codes per byte, the bitsandbytes layout;
* ``absmax``: the block scales, ``(out, in / blocksize)``: float32, or uint8 codes with double quantization;
* replicated (tiny, never sharded): the 16 levels, and with double quantization the second-level scales, their code
  table and offset.

FSDP2 shards parameters along dim 0 by ``torch.chunk``; with ``in`` a multiple of the block size every row holds
whole blocks, so a shard of rows is a shard of ``packed`` and of ``absmax`` (the tensor implements the few aten ops
FSDP2 applies to a parameter: split, new_zeros, slice, copy_, view, as_strided, detach, _to_copy...). Through FSDP2's
all-gather extension (``fsdp_pre_all_gather`` / ``fsdp_post_all_gather``, the design torchao's ``NF4Tensor`` uses)
each unshard gathers the packed codes and scales, 4.5 bits per weight, and rebuilds the full 4-bit tensor; the dense
weight exists only inside :class:`ShardedLinear4bit`'s forward and backward, one layer at a time.

Example::

    weight = Packed4bitTensor.from_params4bit(linear4bit.weight, torch.bfloat16)
    weight.dequantize().shape                  # (out, in): exactly bitsandbytes' dequantization
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from lightning_zenft.precision._bnb import import_bitsandbytes
from lightning_zenft.precision.quantize import dequantize_reference

aten = torch.ops.aten


@dataclass(frozen=True)
class _Replicated:
    """What every shard carries whole: the code table and, with double quantization, the second level."""

    quant_type: str
    blocksize: int
    rows: int  # out_features of the full weight
    code: torch.Tensor  # (16,)
    absmax2: torch.Tensor | None = None  # (ceil(blocks / blocksize2),) float32
    code2: torch.Tensor | None = None  # (256,)
    blocksize2: int = 256
    offset: float = 0.0


class Packed4bitTensor(torch.Tensor):
    """A frozen ``(out, in)`` weight stored in 4 bits (see the module docstring); FSDP2 shards it by rows."""

    packed: torch.Tensor
    absmax: torch.Tensor
    replicated: _Replicated

    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(
        cls,
        packed: torch.Tensor,
        absmax: torch.Tensor,
        shape: tuple[int, int],
        dtype: torch.dtype,
        replicated: _Replicated,
    ) -> Packed4bitTensor:
        return torch.Tensor._make_wrapper_subclass(
            cls, torch.Size(shape), dtype=dtype, device=packed.device, requires_grad=False
        )

    def __init__(
        self,
        packed: torch.Tensor,
        absmax: torch.Tensor,
        shape: tuple[int, int],
        dtype: torch.dtype,
        replicated: _Replicated,
    ) -> None:
        self.packed = packed
        self.absmax = absmax
        self.replicated = replicated

    # ------------------------------------------------------------------ construction and dequantization
    @classmethod
    def from_params4bit(cls, param: torch.Tensor, dtype: torch.dtype) -> Packed4bitTensor:
        """Wrap a quantized bitsandbytes ``Params4bit`` (no copy); ``dtype`` is the dtype it dequantizes into."""
        state = param.quant_state
        rows, cols = (int(s) for s in state.shape)
        blocksize = int(state.blocksize)
        if cols % blocksize or cols % 2:
            raise ValueError(
                f"a 4-bit weight of shape ({rows}, {cols}) cannot be sharded by rows: its width {cols} is not a "
                f"multiple of the quantization block {blocksize}, so blocks straddle rows. Use a block size that "
                "divides the layer width (NF4Precision(blocksize=...)), or skip this layer (skip_modules=[...])."
            )
        nested = bool(state.nested)
        replicated = _Replicated(
            quant_type=state.quant_type,
            blocksize=blocksize,
            rows=rows,
            code=state.code,
            absmax2=state.state2.absmax if nested else None,
            code2=state.state2.code if nested else None,
            blocksize2=int(state.state2.blocksize) if nested else 256,
            offset=float(state.offset) if nested else 0.0,
        )
        packed = param.data.view(torch.uint8).reshape(rows, cols // 2)  # (out, in / 2)
        absmax = state.absmax.reshape(rows, cols // blocksize)  # (out, in / blocksize)
        return cls(packed, absmax, (rows, cols), dtype, replicated)

    def _with(
        self, packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...] | None = None
    ) -> Packed4bitTensor:
        shape = tuple(self.shape) if shape is None else shape
        return Packed4bitTensor(packed, absmax, shape, self.dtype, self.replicated)  # type: ignore[arg-type]

    @property
    def is_full(self) -> bool:
        """True when this holds every row (not a shard)."""
        return self.dim() == 2 and self.shape[0] == self.replicated.rows

    def quant_state(self, dtype: torch.dtype | None = None) -> Any:
        """A bitsandbytes ``QuantState`` over this tensor's storage (full tensors only)."""
        bnb = import_bitsandbytes()
        if not self.is_full:
            raise RuntimeError(
                f"a shard ({tuple(self.shape)}) of a 4-bit weight with {self.replicated.rows} rows cannot be "
                "dequantized on its own; FSDP2 gathers the full weight for the forward."
            )
        rep = self.replicated
        state2 = None
        if rep.absmax2 is not None:
            state2 = bnb.functional.QuantState(
                absmax=rep.absmax2, code=rep.code2, blocksize=rep.blocksize2, dtype=torch.float32
            )
        return bnb.functional.QuantState(
            absmax=self.absmax.reshape(-1),
            shape=torch.Size(self.shape),
            code=rep.code,
            blocksize=rep.blocksize,
            quant_type=rep.quant_type,
            dtype=dtype or self.dtype,
            offset=None if state2 is None else torch.tensor(rep.offset, device=self.absmax.device),
            state2=state2,
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense ``(out, in)`` weight in ``dtype`` (default: this tensor's dtype)."""
        state = self.quant_state(dtype)
        if self.packed.device.type == "cpu":
            return dequantize_reference(self.packed, state)  # (out, in)
        return import_bitsandbytes().functional.dequantize_4bit(self.packed.reshape(-1, 1), state)  # (out, in)

    def to_params4bit(self) -> torch.nn.Parameter:
        """The same storage as a bitsandbytes ``Params4bit`` (full tensors only)."""
        bnb = import_bitsandbytes()
        state = self.quant_state()
        return bnb.nn.Params4bit(
            self.packed.reshape(-1, 1),
            requires_grad=False,
            quant_state=state,
            blocksize=self.replicated.blocksize,
            compress_statistics=state.nested,
            quant_type=self.replicated.quant_type,
            quant_storage=torch.uint8,
            bnb_quantized=True,
        )

    def __repr__(self) -> str:  # type: ignore[override]
        rep = self.replicated
        kind = rep.quant_type + ("-dq" if rep.absmax2 is not None else "")
        return f"Packed4bitTensor({kind}, shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"

    # ------------------------------------------------------------------ subclass protocol
    def __tensor_flatten__(self) -> tuple[list[str], tuple[Any, ...]]:
        return ["packed", "absmax"], (tuple(self.shape), self.dtype, self.replicated)

    @staticmethod
    def __tensor_unflatten__(
        inner: dict[str, torch.Tensor], ctx: tuple[Any, ...], outer_size: Any, outer_stride: Any
    ) -> Packed4bitTensor:
        shape, dtype, replicated = ctx
        return Packed4bitTensor(inner["packed"], inner["absmax"], shape, dtype, replicated)

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is None:
            raise NotImplementedError(
                f"Packed4bitTensor does not implement {func}: it stands for a frozen 4-bit weight that FSDP2 shards "
                "and gathers. Compute with its layer (ShardedLinear4bit) or call .dequantize() first."
            )
        return handler(*args, **kwargs)

    # ------------------------------------------------------------------ FSDP2 all-gather extension
    def fsdp_pre_all_gather(
        self, mesh: Any, outer_size: torch.Size, outer_stride: tuple[int, ...], module: Any, mp_policy: Any
    ) -> tuple[tuple[torch.Tensor, ...], Any]:
        shards = mesh.size()
        if outer_size[0] % shards:
            raise ValueError(
                f"FSDP2 over {shards} ranks cannot shard a 4-bit weight of {outer_size[0]} rows evenly; 4-bit layers "
                f"need out_features divisible by the data-parallel size. Skip {type(module).__name__} layers of this "
                "width (NF4Precision(skip_modules=[...])) or change the number of ranks."
            )
        if shards == 1:  # FSDP2's single-rank path copies one input: send codes and scales as one byte tensor
            scales = self.absmax.contiguous().view(torch.uint8).reshape(self.shape[0], -1)
            return (torch.cat([self.packed, scales], dim=1),), "bytes"  # (out, in / 2 + scale bytes)
        return (self.packed, self.absmax), None

    def fsdp_post_all_gather(
        self,
        all_gather_outputs: tuple[torch.Tensor, ...],
        metadata: Any,
        param_dtype: torch.dtype,
        *,
        out: torch.Tensor | None = None,
    ) -> tuple[Packed4bitTensor, tuple[torch.Tensor, ...]] | None:
        if metadata == "bytes":
            (data,) = all_gather_outputs  # (out, in / 2 + scale bytes)
            width = self.packed.shape[1]
            packed = data[:, :width]  # (out, in / 2)
            absmax = data[:, width:].contiguous().view(self.absmax.dtype)  # (out, in / blocksize)
            if out is not None:
                out.packed.copy_(packed)
                out.absmax.copy_(absmax)
                return None
            packed, absmax = packed.contiguous(), absmax
        else:
            packed, absmax = all_gather_outputs  # (out, in / 2), (out, in / blocksize): every rank's rows
            if out is not None:  # later unshards refill the storage the first one wrapped
                return None
        full = Packed4bitTensor(packed, absmax, (packed.shape[0], self.shape[1]), param_dtype, self.replicated)
        return full, (packed, absmax)


# ---------------------------------------------------------------------- aten ops FSDP2 applies to a parameter
def _rows_only(name: str, dim: int, ndim: int) -> None:
    if dim not in (0, -ndim):
        raise NotImplementedError(f"Packed4bitTensor supports {name} along dim 0 (rows) only; got dim={dim}.")


def _detach(t: Packed4bitTensor) -> Packed4bitTensor:
    return t._with(t.packed.detach(), t.absmax.detach())


def _split(t: Packed4bitTensor, split_size: int, dim: int = 0) -> list[Packed4bitTensor]:
    _rows_only("split", dim, t.dim())
    pieces = zip(t.packed.split(split_size), t.absmax.split(split_size), strict=True)
    return [t._with(p, a, (p.shape[0], t.shape[1])) for p, a in pieces]


def _new_zeros(t: Packed4bitTensor, size: list[int], **kwargs: Any) -> Packed4bitTensor:
    if len(size) != 2 or size[1] != t.shape[1]:
        raise NotImplementedError(f"Packed4bitTensor.new_zeros keeps the width {t.shape[1]}; got size {size}.")
    rows = size[0]
    packed = t.packed.new_zeros((rows, t.packed.shape[1]))
    absmax = t.absmax.new_zeros((rows, t.absmax.shape[1]))
    return t._with(packed, absmax, (rows, t.shape[1]))


def _empty_like(t: Packed4bitTensor, **kwargs: Any) -> Packed4bitTensor:
    return t._with(torch.empty_like(t.packed), torch.empty_like(t.absmax))


def _slice(t: Packed4bitTensor, dim: int = 0, start: int | None = None, end: int | None = None, step: int = 1) -> Any:
    _rows_only("slicing", dim, t.dim())
    if step != 1:
        raise NotImplementedError(f"Packed4bitTensor slicing needs step 1; got {step}.")
    start, end, _ = slice(start, end).indices(t.shape[0])
    packed, absmax = t.packed[start:end], t.absmax[start:end]
    return t._with(packed, absmax, (packed.shape[0],) + tuple(t.shape[1:]))


def _copy_(dst: Packed4bitTensor, src: Any, non_blocking: bool = False) -> Packed4bitTensor:
    if not isinstance(src, Packed4bitTensor) or src.shape != dst.shape:
        raise NotImplementedError(
            f"Packed4bitTensor.copy_ copies another 4-bit tensor of the same shape; got {type(src).__name__} "
            f"{tuple(src.shape)}. Re-quantize dense weights with lightning_zenft.precision instead."
        )
    dst.packed.copy_(src.packed, non_blocking)
    dst.absmax.copy_(src.absmax, non_blocking)
    return dst


def _view(t: Packed4bitTensor, size: list[int]) -> Packed4bitTensor:
    size = list(size)
    if size == [-1] or size == [t.numel()]:  # FSDP2 keeps a flat alias of the padded shard
        return t._with(t.packed, t.absmax, (t.numel(),))
    if math.prod(size) == t.numel() and len(size) == 2 and size[1] in (t.shape[-1], -1) and t.dim() == 2:
        return t._with(t.packed, t.absmax, tuple(t.shape))
    raise NotImplementedError(f"Packed4bitTensor.view{tuple(size)} is not supported (shape {tuple(t.shape)}).")


def _as_strided(t: Packed4bitTensor, size: list[int], stride: list[int], storage_offset: int | None = 0) -> Any:
    contiguous = tuple(torch.empty(size, device="meta").stride())
    if list(size) != list(t.shape) or tuple(stride) != contiguous or (storage_offset or 0) != 0:
        raise NotImplementedError(
            f"Packed4bitTensor.as_strided supports the identity view only; got size {size}, stride {stride}."
        )
    return t._with(t.packed, t.absmax)


def _to_copy(t: Packed4bitTensor, *, dtype: torch.dtype | None = None, device: Any = None, **kwargs: Any) -> Any:
    if dtype is not None and dtype != t.dtype:
        dense = t.dequantize(dtype)  # a dtype change means "give me the dense weight"
        return dense if device is None else dense.to(device)
    if device is None:
        return t._with(t.packed.clone(), t.absmax.clone())
    rep = t.replicated
    moved = _Replicated(
        rep.quant_type,
        rep.blocksize,
        rep.rows,
        rep.code.to(device),
        None if rep.absmax2 is None else rep.absmax2.to(device),
        None if rep.code2 is None else rep.code2.to(device),
        rep.blocksize2,
        rep.offset,
    )
    packed, absmax = t.packed.to(device), t.absmax.to(device)
    return Packed4bitTensor(packed, absmax, tuple(t.shape), t.dtype, moved)  # type: ignore[arg-type]


def _clone(t: Packed4bitTensor, **kwargs: Any) -> Packed4bitTensor:
    return t._with(t.packed.clone(), t.absmax.clone())


def _is_pinned(t: Packed4bitTensor, device: Any = None) -> bool:
    return bool(t.packed.is_pinned() and t.absmax.is_pinned())


def _pin_memory(t: Packed4bitTensor, device: Any = None) -> Packed4bitTensor:
    return t._with(t.packed.pin_memory(), t.absmax.pin_memory())


def _all_gather_into_tensor(t: Packed4bitTensor, group_size: int, group_name: str) -> Packed4bitTensor:
    """A full state dict's gather (``DTensor.full_tensor()``): both inner tensors, waited for here."""
    gather = torch.ops._c10d_functional.all_gather_into_tensor.default
    wait = torch.ops._c10d_functional.wait_tensor.default
    packed = wait(gather(t.packed, group_size, group_name))  # (out, in / 2)
    absmax = wait(gather(t.absmax, group_size, group_name))  # (out, in / blocksize)
    return t._with(packed, absmax, (t.shape[0] * group_size, t.shape[1]))


def _wait_tensor(t: Packed4bitTensor) -> Packed4bitTensor:
    wait = torch.ops._c10d_functional.wait_tensor.default
    return t._with(wait(t.packed), wait(t.absmax))


def _wrap_tensor_autograd(t: Packed4bitTensor) -> Packed4bitTensor:
    return t  # the weight is frozen: nothing for autograd to track


_HANDLERS: dict[Any, Any] = {
    aten.detach.default: _detach,
    aten.split.Tensor: _split,
    aten.new_zeros.default: _new_zeros,
    aten.empty_like.default: _empty_like,
    aten.slice.Tensor: _slice,
    aten.copy_.default: _copy_,
    aten.view.default: _view,
    aten._unsafe_view.default: _view,
    aten.as_strided.default: _as_strided,
    aten._to_copy.default: _to_copy,
    aten.clone.default: _clone,
    aten.is_pinned.default: _is_pinned,
    aten._pin_memory.default: _pin_memory,
    torch.ops._c10d_functional.all_gather_into_tensor.default: _all_gather_into_tensor,
    torch.ops._c10d_functional.wait_tensor.default: _wait_tensor,
    torch.ops._c10d_functional._wrap_tensor_autograd.default: _wrap_tensor_autograd,
}

__all__ = ["Packed4bitTensor"]

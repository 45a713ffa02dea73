"""The 4-bit linear layer FSDP2 shards, and the conversion of bitsandbytes layers to it before ``fully_shard``.

:class:`ShardedLinear4bit` holds a :class:`~lightning_zenft.precision.sharded.Packed4bitTensor` weight (frozen) and
an optional bias. Its forward dequantizes the gathered weight into the compute dtype, multiplies, and frees it; its
backward dequantizes again for the input gradient (the weight never has one). It offers ``dequantize_weight()`` (the
dense weight, for DoRA and merging) and ``nf4_weight()`` (what the fused kernels read), and converts back to a
bitsandbytes ``Linear4bit`` with :meth:`ShardedLinear4bit.to_linear4bit`.

Example::

    names = make_shardable(module)            # every bitsandbytes Linear4bit -> ShardedLinear4bit, same storage
    for block in module.model.model.layers:
        fully_shard(block, mesh=mesh)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_zenft.precision._bnb import import_bitsandbytes
from lightning_zenft.precision.quantize import linear_4bit
from lightning_zenft.precision.sharded import Packed4bitTensor


class ShardedLinear4bit(nn.Module):
    """A frozen 4-bit linear layer whose weight FSDP2 can shard (see the module docstring).

    Args:
        weight: the 4-bit weight.
        bias: the layer's bias Parameter (kept as it is, trainable or not), or None.
        compute_dtype: the dtype the layer multiplies in; outputs come back in the input's dtype.

    Example::

        layer = ShardedLinear4bit.from_linear4bit(linear4bit)
        y = layer(torch.randn(2, layer.in_features))
    """

    def __init__(self, weight: Packed4bitTensor, bias: nn.Parameter | None, compute_dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        self.compute_dtype = compute_dtype
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = bias

    @classmethod
    def from_linear4bit(cls, layer: nn.Module) -> ShardedLinear4bit:
        """Wrap a quantized bitsandbytes ``Linear4bit``'s storage (no copy)."""
        compute_dtype = layer.compute_dtype or layer.weight.quant_state.dtype
        weight = Packed4bitTensor.from_params4bit(layer.weight, compute_dtype)
        new = cls(weight, layer.bias, compute_dtype)
        new.train(layer.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_4bit(x, self.weight.dequantize, self.bias, self.compute_dtype)

    def _full_weight(self) -> Packed4bitTensor:
        weight = self.weight
        local = getattr(weight, "_local_tensor", None)  # a DTensor outside FSDP2's forward: the local shard
        if local is not None:
            raise RuntimeError(
                "this 4-bit layer is sharded by FSDP2 and its weight is not gathered here; read it inside the "
                "forward, or gather the model's full state dict first."
            )
        return weight  # type: ignore[return-value]

    def dequantize_weight(self) -> torch.Tensor:
        """The dense ``(out, in)`` weight in the compute dtype."""
        return self._full_weight().dequantize()

    def nf4_weight(self) -> Any:
        """The weight as the fused kernels read it: an ``NF4Weight`` (NF4), or a dequantizer (FP4)."""
        weight = self._full_weight()
        if weight.replicated.quant_type != "nf4":
            from lightning_zenft.kernels.lora import CallableWeight

            return CallableWeight(self.dequantize_weight, (self.out_features, self.in_features))
        from lightning_zenft.kernels.nf4 import NF4Weight

        state = weight.quant_state()
        nested = bool(state.nested)
        return NF4Weight(
            packed=weight.packed.reshape(-1),
            absmax=state.absmax,
            shape=(self.out_features, self.in_features),
            dtype=self.compute_dtype,
            blocksize=int(state.blocksize),
            code=state.code.float(),
            absmax2=state.state2.absmax if nested else None,
            code2=state.state2.code.float() if nested else None,
            blocksize2=int(state.state2.blocksize) if nested else 256,
            offset=float(state.offset) if nested else 0.0,
        )

    def to_linear4bit(self) -> nn.Module:
        """A bitsandbytes ``Linear4bit`` over the same storage (for export, or to leave FSDP2)."""
        from lightning_zenft.precision.quantize import QuantSpec, to_linear4bit

        params = self._full_weight().to_params4bit()
        state = params.quant_state
        spec = QuantSpec(state.quant_type, bool(state.nested), int(state.blocksize), self.compute_dtype)
        shell = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
        shell.bias = self.bias
        return to_linear4bit(shell, spec, weight=params)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, compute_dtype={self.compute_dtype}"


def make_shardable(model: nn.Module) -> list[str]:
    """Replace every bitsandbytes ``Linear4bit`` in ``model`` by a :class:`ShardedLinear4bit`; returns their names.

    Call it before ``fully_shard`` (NF4Precision does, when it converts a module under ``ModelParallelStrategy``).
    """
    bnb = import_bitsandbytes()
    names = []
    for name, module in list(model.named_modules()):
        if isinstance(module, bnb.nn.Linear4bit):
            if getattr(module.weight, "quant_state", None) is None:
                raise RuntimeError(
                    f"{name!r} is a bitsandbytes Linear4bit whose weight is not quantized yet (bitsandbytes quantizes "
                    "when the layer moves to a CUDA device), so it has no 4-bit storage to shard. Build the model "
                    "with plain nn.Linear layers and let NF4Precision quantize them, or move it to the GPU first."
                )
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, ShardedLinear4bit.from_linear4bit(module))
            names.append(name)
    return names

"""``FrozenLinear4bit``: a bitsandbytes ``Linear4bit`` for a frozen base, exact on every device.

It is a ``bitsandbytes.nn.Linear4bit`` holding a ``Params4bit`` (so ``transformers``, PEFT and the fused kernels read
it as such), with two changes to the layer bitsandbytes 0.50 ships:

* forward and backward dequantize with :func:`~lightning_zenft.precision.quantize.dequantize`, then multiply in the
  compute dtype (the dense weight is rebuilt in backward, never kept). bitsandbytes' own CPU dequantization is wrong
  for some row widths shorter or longer than a block (measured with blocksize 64: widths 16, 32, 48 and 96 are wrong,
  40, 100 and 344 right), which tiny test models and small adapted layers hit;
* the weight keeps its standard layout in CPU inference (bitsandbytes repacks it in place otherwise).

It adds ``dequantize_weight()``, the dense weight that DoRA, merging and the fused kernels' FP4 path read.
Importing this module imports bitsandbytes (with the install command in the error when it is missing).

Example::

    layer = to_linear4bit(nn.Linear(128, 64), QuantSpec())      # a FrozenLinear4bit
    isinstance(layer, bitsandbytes.nn.Linear4bit)               # True
"""

from __future__ import annotations

import functools

import torch

from lightning_zenft.precision._bnb import import_bitsandbytes
from lightning_zenft.precision.quantize import QuantSpec, dequantize, linear_4bit

bnb = import_bitsandbytes()


class FrozenLinear4bit(bnb.nn.Linear4bit):
    """A frozen bitsandbytes 4-bit linear layer (see the module docstring); build it with ``to_linear4bit``.

    Args:
        in_features, out_features: the layer's sizes.
        spec: the quantization (type, double quantization, compute dtype).

    Example::

        layer = to_linear4bit(nn.Linear(128, 64), QuantSpec(compute_dtype=torch.float32))
        y = layer(torch.randn(2, 128))                          # x @ dequant(Q).T + b
    """

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec) -> None:
        super().__init__(
            in_features,
            out_features,
            bias=False,
            compute_dtype=spec.compute_dtype,
            compress_statistics=spec.double_quant,
            quant_type=spec.quant_type,
            quant_storage=torch.uint8,
            device="meta",
        )
        self.support_avx512bf16_for_cpu = False  # no in-place repacking of the weight in CPU inference

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense ``(out, in)`` weight in ``dtype`` (default: the compute dtype)."""
        return dequantize(self.weight, dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dense = functools.partial(dequantize, self.weight)
        return linear_4bit(x, dense, self.bias, self.compute_dtype or x.dtype)

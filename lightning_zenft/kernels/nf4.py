r"""NF4 weights for the fused LoRA kernels: a 4-bit frozen base, dequantized on the fly into a reused buffer.

NF4 (Dettmers et al. 2023, "QLoRA", arXiv:2305.14314) stores each weight as a 4-bit index into 16 quantiles of a
standard normal scaled to ``[-1, 1]``, times the absolute maximum of its block of ``beta`` (64) consecutive weights:

.. math::  w_j = \mathrm{NF4}[q_j] \cdot a_{\lfloor j / \beta \rfloor}

With double quantization the block scales ``a`` are themselves stored as 8-bit codes, in blocks of ``beta_2`` (256),
plus an offset. The layout is the bitsandbytes one (two codes per byte, first in the high nibble; the weight flattened
row-major as ``(out, in)``), so a bitsandbytes ``Params4bit`` is read without conversion (:meth:`NF4Weight.from_bnb`).

:class:`NF4Weight` is a :class:`~lightning_zenft.kernels.lora.FrozenWeight`: passed to
:func:`~lightning_zenft.kernels.fused_lora`, it is dequantized into a buffer shared by all layers of the same device
and dtype (one dense copy of the largest layer, not one per layer), used at once by the GEMM, and dequantized again in
backward, so no dense copy of any weight is ever kept. The Triton kernel does the dequantization on CUDA; elsewhere
:func:`dequantize_nf4_reference` does.

Example::

    nf4 = quantize_nf4(weight)                 # or NF4Weight.from_bnb(linear4bit.weight)
    y = fused_lora(x, nf4, lora_a, lora_b, 2.0)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lightning_zenft.kernels._triton import triton_module
from lightning_zenft.kernels.runtime import KernelRuntime, default_runtime, resolve

# The 16 NF4 levels (QLoRA, appendix E): quantiles of N(0, 1), normalized to [-1, 1], with an exact zero.
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)


def release_nf4_buffers(runtime: KernelRuntime | None = None) -> None:
    """Free the dequantization buffers of ``runtime`` (the default one if None); they are re-created on next use."""
    (default_runtime() if runtime is None else runtime).release_buffers()


@dataclass(eq=False)
class NF4Weight:
    """A frozen ``(out, in)`` weight in NF4 (see the module docstring for the layout).

    Args:
        packed: ``uint8``, ``ceil(out * in / 2)`` bytes.
        absmax: per-block scales: float32 ``(ceil(out * in / blocksize),)``, or uint8 codes when ``absmax2`` is set.
        shape: ``(out, in)``.
        dtype: the dtype to dequantize into (the compute dtype).
        blocksize: weights per scale (64).
        code: the 16 levels (NF4 by default).
        absmax2, code2, blocksize2, offset: the second quantization level of ``absmax``, if any.
        reuse_buffer: dequantize into the runtime's shared buffer (True) or a fresh tensor.
        runtime: whose buffer and Triton switch to use (the default runtime if None).

    Example::

        nf4 = NF4Weight.from_bnb(linear4bit.weight)     # or quantize_nf4(dense_weight)
        w = nf4.dense()                                  # (out, in), valid until the next dense() call
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, int]
    dtype: torch.dtype = torch.bfloat16
    blocksize: int = 64
    code: torch.Tensor | None = None
    absmax2: torch.Tensor | None = None
    code2: torch.Tensor | None = None
    blocksize2: int = 256
    offset: float = 0.0
    reuse_buffer: bool = True
    runtime: KernelRuntime | None = None

    def __post_init__(self) -> None:
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        numel = self.shape[0] * self.shape[1]
        if self.packed.dtype != torch.uint8 or self.packed.numel() != (numel + 1) // 2:
            raise ValueError(
                f"NF4 packed data must be uint8 with ceil({numel} / 2) = {(numel + 1) // 2} bytes for shape "
                f"{self.shape}; got {self.packed.dtype} with {self.packed.numel()}."
            )
        blocks = -(-numel // self.blocksize)
        if self.absmax.numel() != blocks:
            raise ValueError(
                f"NF4 absmax has {self.absmax.numel()} scales; shape {self.shape} with blocksize {self.blocksize} "
                f"needs {blocks}."
            )
        if (self.absmax.dtype == torch.uint8) != (self.absmax2 is not None and self.code2 is not None):
            raise ValueError(
                "NF4 double quantization needs uint8 absmax codes together with absmax2 and code2; got absmax "
                f"{self.absmax.dtype}, absmax2 {'set' if self.absmax2 is not None else 'None'}, code2 "
                f"{'set' if self.code2 is not None else 'None'}."
            )
        if self.code is None:
            self.code = torch.tensor(NF4_CODE, dtype=torch.float32, device=self.packed.device)
        self.packed = self.packed.reshape(-1)
        self.absmax = self.absmax.reshape(-1)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @classmethod
    def from_bnb(
        cls, param: torch.Tensor, dtype: torch.dtype | None = None, runtime: KernelRuntime | None = None
    ) -> NF4Weight:
        """Read a bitsandbytes ``Params4bit`` (NF4, with or without double quantization) without copying it.

        Example::

            nf4 = NF4Weight.from_bnb(linear4bit.weight)
        """
        state = getattr(param, "quant_state", None)
        if state is None:
            raise ValueError(
                "this weight has no quant_state: it is not a quantized bitsandbytes Params4bit "
                "(move the layer to its device first: bitsandbytes quantizes on .to(device))."
            )
        if state.quant_type != "nf4":
            raise ValueError(f"quant_type={state.quant_type!r} is not supported by the NF4 kernel; use 'nf4'.")
        nested = bool(state.nested)
        return cls(
            packed=param.data.view(torch.uint8),
            absmax=state.absmax,
            shape=tuple(state.shape),
            dtype=dtype or state.dtype,
            blocksize=int(state.blocksize),
            code=state.code.float(),
            absmax2=state.state2.absmax if nested else None,
            code2=state.state2.code.float() if nested else None,
            blocksize2=int(state.state2.blocksize) if nested else 256,
            offset=float(state.offset) if nested else 0.0,
            runtime=runtime,
        )

    def scales(self) -> torch.Tensor:
        """The float32 per-block scales ``a`` (undoing double quantization)."""
        if self.absmax2 is None:
            return self.absmax.float()
        blocks = self.absmax.numel()
        outer = self.absmax2.float().repeat_interleave(self.blocksize2)[:blocks]  # (blocks,)
        return self.code2[self.absmax.long()] * outer + self.offset  # (blocks,)

    def dense(self) -> torch.Tensor:
        """The dequantized ``(out, in)`` weight, in the shared buffer unless ``reuse_buffer=False``."""
        numel = self.shape[0] * self.shape[1]
        if self.reuse_buffer:
            out = resolve(self.runtime).buffer(numel, self.device, self.dtype)
        else:
            out = torch.empty(numel, device=self.device, dtype=self.dtype)
        return dequantize_nf4(self, out=out).view(self.shape)


def dequantize_nf4_reference(weight: NF4Weight) -> torch.Tensor:
    """Pure-PyTorch dequantization, the reference for the Triton kernel; returns ``(out, in)`` in ``weight.dtype``."""
    numel = weight.shape[0] * weight.shape[1]
    hi = (weight.packed >> 4).long()
    lo = (weight.packed & 15).long()
    idx = torch.stack([hi, lo], dim=-1).reshape(-1)[:numel]  # (numel,)
    scale = weight.scales().repeat_interleave(weight.blocksize)[:numel]  # (numel,)
    return (weight.code[idx] * scale).to(weight.dtype).view(weight.shape)


def dequantize_nf4(weight: NF4Weight, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize ``weight`` into ``out`` (flat or shaped, ``numel`` values) or a new tensor; Triton where it runs.

    Example::

        w = dequantize_nf4(nf4).view(nf4.shape)
    """
    numel = weight.shape[0] * weight.shape[1]
    if out is None:
        out = torch.empty(numel, device=weight.device, dtype=weight.dtype)
    if out.numel() != numel or not out.is_contiguous() or out.dtype != weight.dtype:
        raise ValueError(
            f"dequantize_nf4 needs a contiguous {weight.dtype} output of {numel} values; got {out.dtype} "
            f"with {out.numel()} values."
        )
    if resolve(weight.runtime).use_triton(weight.packed):
        kernel = triton_module("_nf4_triton")
        kernel.nf4_dequant_triton(
            weight.packed,
            weight.absmax,
            weight.code,
            weight.blocksize,
            out,
            absmax2=weight.absmax2,
            code2=weight.code2,
            blocksize2=weight.blocksize2,
            offset=weight.offset,
        )
        return out
    return out.copy_(dequantize_nf4_reference(weight).view(out.shape))


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, dtype: torch.dtype | None = None) -> NF4Weight:
    """Quantize a dense ``(out, in)`` weight to NF4 (nearest level, single-level scales), in pure PyTorch.

    Example::

        nf4 = quantize_nf4(torch.randn(64, 32))
        (dequantize_nf4(nf4).view(64, 32) - w).abs().max()   # the NF4 rounding error
    """
    if weight.dim() != 2:
        raise ValueError(f"quantize_nf4 takes a 2-D (out, in) weight; got shape {tuple(weight.shape)}.")
    flat = weight.detach().float().reshape(-1)
    numel = flat.numel()
    blocks = -(-numel // blocksize)
    padded = torch.zeros(blocks * blocksize, device=flat.device)
    padded[:numel] = flat
    absmax = padded.view(blocks, blocksize).abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)  # (blocks,)
    normed = (padded.view(blocks, blocksize) / absmax[:, None]).reshape(-1)[:numel]  # (numel,)
    code = torch.tensor(NF4_CODE, device=flat.device)
    midpoints = (code[1:] + code[:-1]) / 2  # (15,)
    idx = torch.bucketize(normed, midpoints).to(torch.uint8)  # (numel,), index of the nearest level
    if numel % 2:
        idx = torch.cat([idx, idx.new_full((1,), 7)])  # pad with the code of 0.0, as bitsandbytes does
    packed = (idx[0::2] << 4) | idx[1::2]  # (ceil(numel / 2),)
    return NF4Weight(packed, absmax, tuple(weight.shape), dtype or weight.dtype, blocksize, code)

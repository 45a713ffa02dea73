r"""Triton NF4 dequantization: packed 4-bit codes and per-block scales to a dense bf16/fp16/fp32 weight.

.. math::  w_j = \mathrm{code}[q_j] \cdot a_{\lfloor j / \beta \rfloor}, \qquad
           a_i = \mathrm{code}_2[\hat a_i] \cdot a^{(2)}_{\lfloor i / \beta_2 \rfloor} + \mathrm{offset}
           \;\text{(double quantization)}

Byte ``t`` of ``packed`` holds ``q_{2t}`` in its high nibble and ``q_{2t+1}`` in its low nibble (the bitsandbytes
layout). Each program reads ``BLOCK`` bytes and writes ``2 BLOCK`` values; the scale lookups hit L1/L2 since
``BLOCK`` bytes span ``2 BLOCK / beta`` blocks.

This module holds ``@triton.jit`` code and is imported only when a Triton path runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _nf4_dequant_kernel(
    packed_ptr,
    absmax_ptr,
    code_ptr,
    absmax2_ptr,
    code2_ptr,
    out_ptr,
    numel,
    offset,
    blocksize,
    blocksize2,
    NESTED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = pid * BLOCK + tl.arange(0, BLOCK)  # byte index, (BLOCK,)
    j_hi = 2 * t  # element index of the high nibble
    j_lo = j_hi + 1
    ok_hi = j_hi < numel
    ok_lo = j_lo < numel
    byte = tl.load(packed_ptr + t, mask=ok_hi, other=0).to(tl.int32)
    v_hi = tl.load(code_ptr + (byte >> 4), mask=ok_hi, other=0.0)
    v_lo = tl.load(code_ptr + (byte & 15), mask=ok_lo, other=0.0)
    blk_hi = j_hi // blocksize
    blk_lo = j_lo // blocksize
    if NESTED:
        q_hi = tl.load(absmax_ptr + blk_hi, mask=ok_hi, other=0).to(tl.int32)
        q_lo = tl.load(absmax_ptr + blk_lo, mask=ok_lo, other=0).to(tl.int32)
        s_hi = tl.load(code2_ptr + q_hi, mask=ok_hi, other=0.0) * tl.load(
            absmax2_ptr + blk_hi // blocksize2, mask=ok_hi, other=0.0
        )
        s_lo = tl.load(code2_ptr + q_lo, mask=ok_lo, other=0.0) * tl.load(
            absmax2_ptr + blk_lo // blocksize2, mask=ok_lo, other=0.0
        )
        s_hi += offset
        s_lo += offset
    else:
        s_hi = tl.load(absmax_ptr + blk_hi, mask=ok_hi, other=0.0)
        s_lo = tl.load(absmax_ptr + blk_lo, mask=ok_lo, other=0.0)
    tl.store(out_ptr + j_hi, (v_hi * s_hi).to(out_ptr.dtype.element_ty), mask=ok_hi)
    tl.store(out_ptr + j_lo, (v_lo * s_lo).to(out_ptr.dtype.element_ty), mask=ok_lo)


def nf4_dequant_triton(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    out: torch.Tensor,
    absmax2: torch.Tensor | None = None,
    code2: torch.Tensor | None = None,
    blocksize2: int = 256,
    offset: float = 0.0,
) -> torch.Tensor:
    """Dequantize into ``out`` (contiguous, ``numel`` values); ``absmax2``/``code2`` given for double quantization."""
    numel = out.numel()
    nested = absmax2 is not None
    block = 1024
    grid = (triton.cdiv((numel + 1) // 2, block),)
    _nf4_dequant_kernel[grid](
        packed,
        absmax,
        code,
        absmax2 if nested else code,
        code2 if nested else code,
        out,
        numel,
        float(offset),
        blocksize,
        blocksize2,
        NESTED=nested,
        BLOCK=block,
    )
    return out

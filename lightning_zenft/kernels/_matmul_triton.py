r"""Triton GEMM with a low-rank epilogue: one pass writes the base product plus the LoRA term.

.. math::  C = [C_0] + X W + P Q + \mathbf{1} b^T, \qquad X \in \mathbb{R}^{M \times K},\;
           W \in \mathbb{R}^{K \times N},\; P \in \mathbb{R}^{M \times R},\; Q \in \mathbb{R}^{R \times N}

Forward of a LoRA layer is ``X = x``, ``W = W_base^T``, ``P = x A^T``, ``Q = s B^T``; its input gradient is
``X = dY``, ``W = W_base``, ``P = dY B``, ``Q = s A``. With cuBLAS alone the rank-``R`` product is a separate
kernel: it writes ``P Q`` to ``C`` and the big GEMM reads it back in its ``beta = 1`` epilogue (``2 M N`` extra
bytes, plus a launch). Here the rank-``R`` product is accumulated into the same fp32 tile before the single store,
so the LoRA term costs ``R / K`` extra FLOPs and no extra traffic on ``C``. ``C_0`` (optional) lets several
products accumulate into one output (the input gradient of q/k/v projections that read the same input).

All operands are addressed by strides, so transposed views (``W_base.t()``, Conv1D weights) need no copy. Tiles are
visited in groups of ``GROUP_M`` row blocks so that neighbouring programs share ``W`` tiles in L2. Triton's CPU
interpreter multiplies 16-bit operands wrongly, so under it (``UPCAST``) tiles are widened to fp32 before ``tl.dot``;
compiled kernels feed bf16/fp16 tiles to the tensor cores directly. Only core builtins are used in kernels (no
``tl.cdiv``/``tl.zeros``, which are themselves jitted), so the kernels also run under the interpreter when
``triton.language`` was imported before ``TRITON_INTERPRET`` was set.

This module holds ``@triton.jit`` code and is imported only when a Triton path runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lightning_zenft.kernels._triton import interpret_mode


def _configs() -> list[triton.Config]:
    if interpret_mode():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}, num_warps=1)]
    shapes = [
        (128, 256, 64, 3, 8),
        (256, 128, 64, 3, 8),
        (128, 128, 64, 4, 4),
        (128, 128, 32, 4, 4),
        (64, 256, 32, 4, 8),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
    ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=stages, num_warps=warps)
        for bm, bn, bk, stages, warps in shapes
    ]


@triton.jit
def _tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program ``pid``'s output tile, visiting ``GROUP_M`` row blocks per column sweep so they share W tiles in L2."""
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    num_n = (N + BLOCK_N - 1) // BLOCK_N
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + ((pid % per_group) % group_rows), (pid % per_group) // group_rows


@triton.jit
def _load_tile(ptr, rows, cols, stride_r, stride_c, rows_ok, cols_ok, UPCAST: tl.constexpr):
    """The tile ``ptr[rows, cols]`` (zero outside the masks), widened to fp32 under the interpreter (``UPCAST``)."""
    tile = tl.load(
        ptr + rows[:, None] * stride_r + cols[None, :] * stride_c, mask=rows_ok[:, None] & cols_ok[None, :], other=0.0
    )
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _epilogue(
    acc,
    rm,
    rn,
    M,
    N,
    R,
    p_ptr,
    q_ptr,
    bias_ptr,
    c0_ptr,
    c_ptr,
    stride_pm,
    stride_pr,
    stride_qr,
    stride_qn,
    stride_c0m,
    stride_c0n,
    stride_cm,
    stride_cn,
    HAS_LOWRANK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_C0: tl.constexpr,
    BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Add ``P Q``, the bias and ``C_0`` to the fp32 tile ``acc`` (rows ``rm``, columns ``rn``) and store it once."""
    m_ok = rm < M
    n_ok = rn < N
    if HAS_LOWRANK:
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            r_ok = rr < R
            p = _load_tile(p_ptr, rm, rr, stride_pm, stride_pr, m_ok, r_ok, UPCAST)  # (BM, BR)
            q = _load_tile(q_ptr, rr, rn, stride_qr, stride_qn, r_ok, n_ok, UPCAST)  # (BR, BN)
            acc = tl.dot(p, q, acc)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)  # (BN,)
        acc += bias[None, :]
    out_mask = m_ok[:, None] & n_ok[None, :]
    if HAS_C0:
        c0 = tl.load(c0_ptr + rm[:, None] * stride_c0m + rn[None, :] * stride_c0n, mask=out_mask, other=0.0)
        acc += c0.to(tl.float32)
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty), mask=out_mask)


@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K", "R"])
@triton.jit
def _lowrank_matmul_kernel(
    x_ptr,
    w_ptr,
    p_ptr,
    q_ptr,
    bias_ptr,
    c0_ptr,
    c_ptr,
    M,
    N,
    K,
    R,
    stride_xm,
    stride_xk,
    stride_wk,
    stride_wn,
    stride_pm,
    stride_pr,
    stride_qr,
    stride_qn,
    stride_c0m,
    stride_c0n,
    stride_cm,
    stride_cn,
    M_BUCKET,
    HAS_LOWRANK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_C0: tl.constexpr,
    BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    rk = tl.arange(0, BLOCK_K)  # (BK,)
    m_ok = rm < M
    n_ok = rn < N

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        x = _load_tile(x_ptr, rm, kk, stride_xm, stride_xk, m_ok, k_ok, UPCAST)  # (BM, BK)
        w = _load_tile(w_ptr, kk, rn, stride_wk, stride_wn, k_ok, n_ok, UPCAST)  # (BK, BN)
        acc = tl.dot(x, w, acc)

    _epilogue(acc, rm, rn, M, N, R, p_ptr, q_ptr, bias_ptr, c0_ptr, c_ptr, stride_pm, stride_pr, stride_qr,
              stride_qn, stride_c0m, stride_c0n, stride_cm, stride_cn, HAS_LOWRANK, HAS_BIAS, HAS_C0, BLOCK_R,
              UPCAST)  # fmt: skip


def _tma_configs() -> list[triton.Config]:
    if interpret_mode():
        tiles = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}
        return [triton.Config(tiles, num_warps=1, pre_hook=_tma_blocks)]
    # 128x256 tiles spill registers here once the epilogue adds C_0 (checked by tests/kernels/compile_sm90.py)
    shapes = [(256, 128, 64, 3, 8), (128, 128, 64, 4, 8), (128, 128, 64, 4, 4), (128, 64, 64, 4, 4)]
    return [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
            num_stages=stages,
            num_warps=warps,
            pre_hook=_tma_blocks,
        )
        for bm, bn, bk, stages, warps in shapes
    ]


def _tma_blocks(nargs: dict) -> None:
    """Give the tensor descriptors the tile shape of the config being run (autotuning changes it)."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["x_desc"].block_shape = [bm, bk]
    nargs["w_desc"].block_shape = [bn, bk] if nargs["W_NK"] else [bk, bn]


@triton.autotune(configs=_tma_configs(), key=["M_BUCKET", "N", "K", "R", "W_NK"])
@triton.jit
def _lowrank_matmul_tma_kernel(
    x_desc,
    w_desc,
    p_ptr,
    q_ptr,
    bias_ptr,
    c0_ptr,
    c_ptr,
    M,
    N,
    K,
    R,
    stride_pm,
    stride_pr,
    stride_qr,
    stride_qn,
    stride_c0m,
    stride_c0n,
    stride_cm,
    stride_cn,
    M_BUCKET,
    W_NK: tl.constexpr,
    HAS_LOWRANK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_C0: tl.constexpr,
    BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """The same product with ``X`` and ``W`` tiles fetched by the Hopper tensor-memory accelerator (TMA)."""
    pid_m, pid_n = _tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = x_desc.load([pid_m * BLOCK_M, k0])  # (BM, BK); out-of-range elements read as zero
        if W_NK:
            w = tl.trans(w_desc.load([pid_n * BLOCK_N, k0]))  # (BK, BN) from a row-major (N, K) weight
        else:
            w = w_desc.load([k0, pid_n * BLOCK_N])  # (BK, BN)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    _epilogue(acc, rm, rn, M, N, R, p_ptr, q_ptr, bias_ptr, c0_ptr, c_ptr, stride_pm, stride_pr, stride_qr,
              stride_qn, stride_c0m, stride_c0n, stride_cm, stride_cn, HAS_LOWRANK, HAS_BIAS, HAS_C0, BLOCK_R,
              UPCAST)  # fmt: skip


def tma_compatible(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether TMA can fetch ``x (M, K)`` and ``w (K, N)`` (or its transpose): non-empty, unit last stride, 16-byte
    aligned rows and base."""

    def ok(t: torch.Tensor) -> bool:
        size = t.element_size()
        return t.stride(1) == 1 and (t.stride(0) * size) % 16 == 0 and t.data_ptr() % 16 == 0

    return x.numel() > 0 and w.numel() > 0 and ok(x) and (ok(w) or ok(w.t()))


def lowrank_matmul_triton(
    x: torch.Tensor,
    w: torch.Tensor,
    p: torch.Tensor | None,
    q: torch.Tensor | None,
    bias: torch.Tensor | None,
    c0: torch.Tensor | None,
    tma: bool = False,
) -> torch.Tensor:
    """Launch the kernel: ``c0 + x @ w + p @ q + bias`` with x (M, K), w (K, N), p (M, R), q (R, N); all 2-D.

    ``tma``: fetch ``x`` and ``w`` tiles with the TMA (Hopper; :func:`tma_compatible` must hold).
    """
    m, k = x.shape
    n = w.shape[1]
    r = 0 if p is None else p.shape[1]
    c = torch.empty((m, n), device=x.device, dtype=x.dtype)
    block_r = max(16, triton.next_power_of_2(r)) if r else 16
    block_r = min(block_r, 64)
    dummy = c  # never read when the matching HAS_* flag is off
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
    if tma:
        _launch_tma(x, w, p, q, bias, c0, c, block_r, grid)
        return c
    _lowrank_matmul_kernel[grid](
        x,
        w,
        p if p is not None else dummy,
        q if q is not None else dummy,
        bias if bias is not None else dummy,
        c0 if c0 is not None else dummy,
        c,
        m,
        n,
        k,
        r,
        x.stride(0),
        x.stride(1),
        w.stride(0),
        w.stride(1),
        p.stride(0) if p is not None else 0,
        p.stride(1) if p is not None else 0,
        q.stride(0) if q is not None else 0,
        q.stride(1) if q is not None else 0,
        c0.stride(0) if c0 is not None else 0,
        c0.stride(1) if c0 is not None else 0,
        c.stride(0),
        c.stride(1),
        triton.next_power_of_2(m),  # tuning key: one tuning per power-of-two token count, not per length
        HAS_LOWRANK=r > 0,
        HAS_BIAS=bias is not None,
        HAS_C0=c0 is not None,
        BLOCK_R=block_r,
        UPCAST=interpret_mode(),
    )
    return c


def _launch_tma(
    x: torch.Tensor,
    w: torch.Tensor,
    p: torch.Tensor | None,
    q: torch.Tensor | None,
    bias: torch.Tensor | None,
    c0: torch.Tensor | None,
    c: torch.Tensor,
    block_r: int,
    grid: object,
) -> None:
    from triton.tools.tensor_descriptor import TensorDescriptor

    m, k = x.shape
    n = w.shape[1]
    r = 0 if p is None else p.shape[1]
    w_nk = w.stride(1) != 1  # w is the transposed view of a row-major (N, K) weight
    w_desc = TensorDescriptor.from_tensor(w.t() if w_nk else w, [16, 16])  # tile shape set per config (_tma_blocks)
    dummy = c
    _lowrank_matmul_tma_kernel[grid](
        TensorDescriptor.from_tensor(x, [16, 16]),
        w_desc,
        p if p is not None else dummy,
        q if q is not None else dummy,
        bias if bias is not None else dummy,
        c0 if c0 is not None else dummy,
        c,
        m,
        n,
        k,
        r,
        p.stride(0) if p is not None else 0,
        p.stride(1) if p is not None else 0,
        q.stride(0) if q is not None else 0,
        q.stride(1) if q is not None else 0,
        c0.stride(0) if c0 is not None else 0,
        c0.stride(1) if c0 is not None else 0,
        c.stride(0),
        c.stride(1),
        triton.next_power_of_2(m),
        W_NK=w_nk,
        HAS_LOWRANK=r > 0,
        HAS_BIAS=bias is not None,
        HAS_C0=c0 is not None,
        BLOCK_R=block_r,
        UPCAST=interpret_mode(),
    )

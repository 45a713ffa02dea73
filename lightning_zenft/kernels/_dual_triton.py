r"""Both low-rank products of a LoRA backward that read the output gradient, from one pass over it.

.. math::  P = dY\, B \quad (M \times R), \qquad G = dY^T X_A \quad (N \times R), \qquad
           dY: M \times N,\; B: N \times R,\; X_A = X A^T: M \times R

Two cuBLAS calls read ``dY`` (the largest tensor of the backward besides the weight) twice; this kernel reads each
``dY`` tile once and feeds it to both products. A program owns ``BLOCK_M`` rows and one of ``SPLIT_N`` column
ranges: it accumulates its rows of ``P`` over its columns, and writes each column block's ``G`` partial for its rows.
The partials go to fp32 workspaces, ``(SPLIT_N, M, R)`` and ``(ceil(M / BLOCK_M), N, R)``, summed by the launcher:
plain stores, no atomics, and a deterministic result. With ``BLOCK_M = 256`` the ``G`` workspace is about
``N R / 16`` floats per 1k tokens, a small fraction of ``dY``'s own bytes.

Under Triton's CPU interpreter (``UPCAST``) tiles are widened to fp32 before ``tl.dot``, as in ``_matmul_triton``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lightning_zenft.kernels._matmul_triton import _load_tile
from lightning_zenft.kernels._triton import interpret_mode

# (BLOCK_M, BLOCK_N, num_warps, num_stages): many tokens, then few.
CONFIGS = [(256, 64, 8, 3), (64, 64, 4, 3)]


@triton.jit
def _dual_lowrank_kernel(
    dy_ptr,
    b_ptr,
    xa_ptr,
    p_ws_ptr,
    g_ws_ptr,
    M,
    N,
    R,
    N_PER_SPLIT,
    stride_dym,
    stride_dyn,
    stride_bn,
    stride_br,
    stride_xam,
    stride_xar,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    rr = tl.arange(0, BLOCK_R)  # (BR,)
    m_ok = rm < M
    r_ok = rr < R
    xa = _load_tile(xa_ptr, rm, rr, stride_xam, stride_xar, m_ok, r_ok, UPCAST)  # (BM, BR)
    acc = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
    n_start = pid_s * N_PER_SPLIT
    n_stop = tl.minimum(n_start + N_PER_SPLIT, N)
    for n0 in range(n_start, n_stop, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)  # (BN,)
        n_ok = rn < n_stop
        dy = _load_tile(dy_ptr, rm, rn, stride_dym, stride_dyn, m_ok, n_ok, UPCAST)  # (BM, BN)
        b = _load_tile(b_ptr, rn, rr, stride_bn, stride_br, n_ok, r_ok, UPCAST)  # (BN, BR)
        acc = tl.dot(dy, b, acc)
        g = tl.dot(tl.trans(dy), xa)  # (BN, BR), this row block's share of dY^T X_A
        g_rows = pid_m * N + rn
        tl.store(g_ws_ptr + g_rows[:, None] * R + rr[None, :], g, mask=n_ok[:, None] & r_ok[None, :])
    p_rows = pid_s * M + rm
    tl.store(p_ws_ptr + p_rows[:, None] * R + rr[None, :], acc, mask=m_ok[:, None] & r_ok[None, :])


def dual_lowrank_triton(
    dy: torch.Tensor, b: torch.Tensor, xa: torch.Tensor, split: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dy @ b, dy.t() @ xa)`` for ``dy (M, N)``, ``b (N, R)``, ``xa (M, R)``; both in ``dy``'s dtype.

    ``split``: column ranges per row block (default: enough programs to fill the GPU's multiprocessors).
    """
    m, n = dy.shape
    r = b.shape[1]
    if m == 0 or n == 0:
        return dy.new_zeros((m, r)), dy.new_zeros((n, r))
    if interpret_mode():
        block_m, block_n, warps, stages = 16, 16, 1, 1
    else:
        block_m, block_n, warps, stages = CONFIGS[0] if m >= 4096 else CONFIGS[1]
    block_r = max(16, triton.next_power_of_2(r))
    grid_m = triton.cdiv(m, block_m)
    sm_count = 1 if interpret_mode() else torch.cuda.get_device_properties(dy.device).multi_processor_count
    split = split or max(1, min(triton.cdiv(n, block_n), triton.cdiv(sm_count, grid_m)))
    n_per_split = triton.cdiv(triton.cdiv(n, split), block_n) * block_n
    split = triton.cdiv(n, n_per_split)
    p_ws = torch.empty((split, m, r), device=dy.device, dtype=torch.float32)
    g_ws = torch.empty((grid_m, n, r), device=dy.device, dtype=torch.float32)
    _dual_lowrank_kernel[(grid_m, split)](
        dy,
        b,
        xa,
        p_ws,
        g_ws,
        m,
        n,
        r,
        n_per_split,
        dy.stride(0),
        dy.stride(1),
        b.stride(0),
        b.stride(1),
        xa.stride(0),
        xa.stride(1),
        UPCAST=interpret_mode(),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_R=block_r,
        num_warps=warps,
        num_stages=stages,
    )
    p = p_ws[0] if split == 1 else p_ws.sum(0)
    g = g_ws[0] if grid_m == 1 else g_ws.sum(0)
    return p.to(dy.dtype), g.to(dy.dtype)

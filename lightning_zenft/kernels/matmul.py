r"""``C = [C_0] + X W + P Q + b``: the product every fused LoRA kernel is made of, on the faster of two back ends.

.. math::  C = C_0 + X W + P Q + \mathbf{1} b^T
           \qquad (X: M \times K,\; W: K \times N,\; P: M \times R,\; Q: R \times N)

* ``"torch"``: cuBLAS. The rank-``R`` term first (``addmm(b, P, Q)``, or ``addmm_`` into ``C_0``), then the big
  GEMM in place with ``beta = 1`` (``C.addmm_(X, W)``), whose epilogue reads the partial sum while the K loop runs:
  one extra write of ``C`` (the small product) instead of a separate read and write after the big GEMM; no
  temporary beyond ``C``.
* ``"triton"``: one Triton GEMM that adds ``P Q``, ``b`` and ``C_0`` to its fp32 tile before the single store
  (``_matmul_triton``), saving the extra write and read of ``C`` that the torch path costs.
* ``"triton-tma"``: the same GEMM fetching its ``X`` and ``W`` tiles with Hopper's tensor-memory accelerator (TMA),
  where the operands allow it (unit last stride, 16-byte rows), else ``"triton"``.
* ``"auto"`` (the default): on CUDA, the first call for each shape times every eligible back end once and keeps the
  fastest, so Triton runs where it beats cuBLAS and cuBLAS where it does not (a TMA build that fails on this Triton
  or GPU is dropped with one warning); on CPU, torch, unless Triton's interpreter is forced (``TRITON_INTERPRET=1``,
  tests), then Triton.

Example::

    c = lowrank_matmul(x, w.t(), p=xa, q=(s * b).t(), bias=bias)   # x @ w.T + s * xa @ b.T + bias
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from lightning_zenft.kernels._triton import interpret_mode, triton_module
from lightning_zenft.kernels.runtime import EpilogueBackend, KernelRuntime, default_runtime, resolve


def set_matmul_backend(backend: EpilogueBackend) -> None:
    """Pick the back end of :func:`lowrank_matmul` for the default runtime (see the module docstring).

    A :class:`~lightning_zenft.FusedKernels` callback has its own runtime (``FusedKernels(matmul_backend=...)``);
    it copies the default runtime's back end when fitting starts unless given one.

    Example::

        set_matmul_backend("torch")   # cuBLAS only, e.g. to measure what the Triton epilogue buys
    """
    default_runtime().set_backend(backend)


def _torch_path(
    x: torch.Tensor,
    w: torch.Tensor,
    p: torch.Tensor | None,
    q: torch.Tensor | None,
    bias: torch.Tensor | None,
    c0: torch.Tensor | None,
) -> torch.Tensor:
    # The cheap rank-R product goes first and the big GEMM last, with beta = 1: cuBLAS reads the partial sum in its
    # epilogue, overlapped with the K loop, instead of a separate pass re-reading and re-writing the finished C.
    low = p is not None and q is not None
    if c0 is not None:
        out = c0.addmm_(p, q) if low else c0  # (M, N), in place on the caller's accumulator
        if bias is not None:
            out.add_(bias)
    elif low:
        out = torch.addmm(bias, p, q) if bias is not None else torch.mm(p, q)  # (M, N)
    elif bias is not None:
        return torch.addmm(bias, x, w)  # (M, N)
    else:
        return torch.mm(x, w)  # (M, N)
    return out.addmm_(x, w)


def _triton_path(
    x: torch.Tensor,
    w: torch.Tensor,
    p: torch.Tensor | None,
    q: torch.Tensor | None,
    bias: torch.Tensor | None,
    c0: torch.Tensor | None,
    tma: bool = False,
) -> torch.Tensor:
    kernel = triton_module("_matmul_triton")
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()  # the kernel reads bias[n] at bias_ptr + n
    if p is not None and q is not None and q.dtype != p.dtype:
        q = q.to(p.dtype)
    return kernel.lowrank_matmul_triton(x, w, p, q, bias, c0, tma=tma)


def _tma_eligible(x: torch.Tensor, w: torch.Tensor, runtime: KernelRuntime) -> bool:
    if runtime.tma_failed or not triton_module("_matmul_triton").tma_compatible(x, w):
        return False
    return interpret_mode() or torch.cuda.get_device_capability(x.device)[0] >= 9


def _time_ms(fn: object, reps: int = 5) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()  # warm-up (and Triton's own autotuning)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def _fastest(key: tuple, candidates: dict[str, Callable[[], object]], runtime: KernelRuntime) -> str:
    """Time every candidate once for ``key`` (first call only) and remember the fastest one's name in ``runtime``.

    A ``"tma"`` candidate that raises (a Triton or GPU without TMA support) is dropped for good, with one warning.
    """
    choice = runtime.choices.get(key)
    if choice is None:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return "torch"
        times = {}
        for name, fn in candidates.items():
            try:
                times[name] = _time_ms(fn)
            except Exception as err:  # noqa: BLE001 - only the optional TMA build may fail here
                if name != "tma":
                    raise
                runtime.tma_failed.append(f"{type(err).__name__}: {err}")
                why = f"lowrank_matmul: the TMA GEMM failed here and is not used ({runtime.tma_failed[0]})."
                warnings.warn(why, stacklevel=3)
        choice = runtime.choices[key] = min(times, key=times.__getitem__)
    return choice


def _choose(
    x: torch.Tensor,
    w: torch.Tensor,
    p: torch.Tensor | None,
    q: torch.Tensor | None,
    bias: torch.Tensor | None,
    c0: torch.Tensor | None,
    runtime: KernelRuntime,
) -> str:
    """``"torch"``, ``"triton"`` or ``"tma"`` for this call (see the module docstring)."""
    if runtime.backend == "torch" or not runtime.use_triton(x, w):
        return "torch"
    if runtime.backend == "triton-tma":
        return "tma" if _tma_eligible(x, w, runtime) else "triton"
    if runtime.backend == "triton" or interpret_mode():
        return "triton"
    r = 0 if p is None else p.shape[1]
    tma_ok = _tma_eligible(x, w, runtime)
    layout = (x.stride(1) == 1, w.stride(1) == 1, tma_ok)  # a choice of TMA holds only for operands TMA can read
    key = ("mm", _bucket(x.shape[0]), tuple(w.shape), layout, r, x.dtype, bias is not None, c0 is not None,
           x.device.index)  # fmt: skip
    if key in runtime.choices:
        return runtime.choices[key]
    scratch = None if c0 is None else c0.clone()  # the torch path accumulates in place: time it on a copy
    candidates = {
        "torch": lambda: _torch_path(x, w, p, q, bias, scratch),  # no re-copy inside the timing: values do not matter
        "triton": lambda: _triton_path(x, w, p, q, bias, c0),
    }
    if tma_ok:
        candidates["tma"] = lambda: _triton_path(x, w, p, q, bias, c0, tma=True)
    return _fastest(key, candidates, runtime)


def matmul_choices(runtime: KernelRuntime | None = None) -> dict[str, str]:
    """What ``"auto"`` chose so far in ``runtime`` (the default one if None), per timed shape.

    ``FusedKernels`` has its own runtime: ``callback.runtime.choices_report()`` (it logs the tally itself).

    Example::

        lowrank_matmul(x, w.t(), p, q)      # on a GPU
        print(matmul_choices())             # {"mm M<=8192 w(4096, 4096) r=16 bfloat16": "triton", ...}
    """
    return resolve(runtime).choices_report()


def _bucket(m: int) -> int:
    return 1 << max(m - 1, 0).bit_length()  # one choice per power-of-two token count


def dual_lowrank(
    dy: torch.Tensor, b: torch.Tensor, xa: torch.Tensor, runtime: KernelRuntime | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dy @ b, dy.t() @ xa)``: the two products of a LoRA backward that read ``dy``, on the faster back end.

    ``dy (M, N)``, ``b (N, R)``, ``xa (M, R)``. The Triton back end (``_dual_triton``) reads ``dy`` once for both;
    the torch back end is two cuBLAS calls. ``"auto"`` times both once per shape on CUDA, as :func:`lowrank_matmul`.

    Example::

        dyb, grad_b = dual_lowrank(dy, lora_b, xa)    # then grad_b * scaling
    """
    if dy.dim() != 2 or b.shape != (dy.shape[1], xa.shape[1]) or xa.shape[0] != dy.shape[0]:
        raise ValueError(
            f"dual_lowrank needs dy (M, N), b (N, R), xa (M, R); got {tuple(dy.shape)}, {tuple(b.shape)}, "
            f"{tuple(xa.shape)}."
        )

    def torch_fn() -> tuple[torch.Tensor, torch.Tensor]:
        return dy @ b, dy.t() @ xa

    def triton_fn() -> tuple[torch.Tensor, torch.Tensor]:
        return triton_module("_dual_triton").dual_lowrank_triton(dy, b.to(dy.dtype), xa.to(dy.dtype))

    runtime = resolve(runtime)
    if runtime.backend == "torch" or not runtime.use_triton(dy, b, xa):
        return torch_fn()
    if runtime.backend in ("triton", "triton-tma") or interpret_mode():
        return triton_fn()
    key = ("dual", _bucket(dy.shape[0]), dy.shape[1], b.shape[1], dy.dtype, dy.device.index)
    chosen = _fastest(key, {"torch": torch_fn, "triton": triton_fn}, runtime)
    return triton_fn() if chosen == "triton" else torch_fn()


def lowrank_matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    p: torch.Tensor | None = None,
    q: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    c0: torch.Tensor | None = None,
    runtime: KernelRuntime | None = None,
) -> torch.Tensor:
    """``c0 + x @ w + p @ q + bias`` for 2-D ``x (M, K)``, ``w (K, N)``, ``p (M, R)``, ``q (R, N)``, ``bias (N,)``.

    ``w`` may be a transposed view (``weight.t()``): no copy is made. ``c0`` is an accumulator the call may overwrite
    (the torch path adds into it in place; the Triton path returns a new tensor). ``runtime`` holds the back-end
    choice and its cache (the default runtime if None).
    """
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(f"lowrank_matmul needs x (M, K) and w (K, N); got x {tuple(x.shape)}, w {tuple(w.shape)}.")
    if (p is None) != (q is None):
        raise ValueError("lowrank_matmul needs both p and q for the low-rank term, or neither.")
    choice = _choose(x, w, p, q, bias, c0, resolve(runtime))
    if choice == "torch":
        return _torch_path(x, w, p, q, bias, c0)
    return _triton_path(x, w, p, q, bias, c0, tma=choice == "tma")

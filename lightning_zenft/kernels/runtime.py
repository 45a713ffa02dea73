"""The state of the fused kernels, in one object: which back end runs, what ``"auto"`` chose, and scratch buffers.

Nothing here is a process global that the kernels read behind the caller's back: every kernel takes a
:class:`KernelRuntime` (``runtime=``), and the autograd functions keep the one their forward ran with for their
backward. :class:`~lightning_zenft.FusedKernels` owns one per callback; direct functional calls that pass none use
:func:`default_runtime`, the object :func:`~lightning_zenft.kernels.set_matmul_backend` and
:func:`~lightning_zenft.kernels.set_triton_enabled` configure.

Example::

    rt = KernelRuntime(backend="torch")               # cuBLAS only, its own caches
    y = fused_lora(x, w, a, b, 2.0, runtime=rt)
    rt.choices_report()                                # what "auto" chose per product shape (empty here)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from lightning_zenft.kernels._triton import interpret_mode, triton_installed

EpilogueBackend = Literal["auto", "triton", "triton-tma", "torch"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "triton-tma", "torch")


@dataclass(eq=False)
class KernelRuntime:
    """Back-end switches and caches of the fused kernels.

    Args:
        backend: the back end of the epilogue GEMM and of ``dual_lowrank`` (see :mod:`~lightning_zenft.kernels.
            matmul`): ``"auto"`` times the candidates once per shape on CUDA and keeps the fastest.
        triton: ``False`` turns every Triton path off (the torch paths compute the same math).

    Attributes:
        choices: what ``"auto"`` chose, per product key.
        tma_failed: the error of a TMA build that failed on this device (``"auto"`` then stops trying it).
        buffers: the scratch tensors 4-bit weights are dequantized into, one per ``(device, dtype)``.
    """

    backend: EpilogueBackend = "auto"
    triton: bool = True
    choices: dict[tuple, str] = field(default_factory=dict)
    tma_failed: list[str] = field(default_factory=list)
    buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"matmul backend={self.backend!r} is not one of {', '.join(map(repr, BACKENDS))}.")

    def set_backend(self, backend: EpilogueBackend) -> None:
        """Pick the back end (see :class:`KernelRuntime`); forgets what ``"auto"`` chose so far."""
        if backend not in BACKENDS:
            raise ValueError(f"matmul backend={backend!r} is not one of {', '.join(map(repr, BACKENDS))}.")
        self.backend = backend
        self.choices.clear()

    def use_triton(self, *tensors: torch.Tensor) -> bool:
        """Whether the Triton path runs for these tensors: all on CUDA (or the interpreter forced), Triton present."""
        if not self.triton:
            return False
        if interpret_mode():
            return triton_installed() and all(t.device.type == "cpu" for t in tensors)
        return all(t.is_cuda for t in tensors) and triton_installed()

    def buffer(self, numel: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """A flat scratch tensor of at least ``numel`` values, one per ``(device, dtype)``, reused across calls."""
        key = (device, dtype)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = self.buffers[key] = torch.empty(numel, device=device, dtype=dtype)
        return buf[:numel]

    def release_buffers(self) -> None:
        """Free the scratch buffers (they are re-created on the next call)."""
        self.buffers.clear()

    def derive(self, backend: EpilogueBackend | None = None, triton: bool | None = None) -> KernelRuntime:
        """A new runtime with empty caches and these switches; ``None`` takes this runtime's value."""
        return KernelRuntime(
            backend=self.backend if backend is None else backend, triton=self.triton if triton is None else triton
        )

    def choices_report(self) -> dict[str, str]:
        """What ``"auto"`` chose so far, per timed shape: ``{"mm M<=8192 w(4096, 4096) r=16 ...": "triton", ...}``."""
        out = {}
        for key, choice in self.choices.items():
            if key[0] == "mm":
                _, bucket, w_shape, layout, r, dtype, bias, c0, _ = key
                extras = ("+bias" if bias else "") + ("+c0" if c0 else "") + (" tma-readable" if layout[2] else "")
                out[f"mm M<={bucket} w{tuple(w_shape)} r={r} {str(dtype).removeprefix('torch.')}{extras}"] = choice
            else:
                _, bucket, n, r, dtype, _ = key
                out[f"dual M<={bucket} N={n} r={r} {str(dtype).removeprefix('torch.')}"] = choice
        return out


_DEFAULT = KernelRuntime()


def default_runtime() -> KernelRuntime:
    """The runtime of kernel calls that pass none (functional use); ``set_matmul_backend`` configures it."""
    return _DEFAULT


def set_triton_enabled(enabled: bool) -> None:
    """Turn every Triton path of the default runtime off (``False``) or back on; the torch paths compute the same math.

    A :class:`~lightning_zenft.FusedKernels` callback copies the default runtime's switches when fitting starts.

    Example::

        set_triton_enabled(False)   # e.g. to compare against the torch path in a benchmark
    """
    default_runtime().triton = enabled


def triton_enabled(*tensors: torch.Tensor) -> bool:
    """Whether the default runtime runs Triton for these tensors (see :meth:`KernelRuntime.use_triton`)."""
    return default_runtime().use_triton(*tensors)


def resolve(runtime: KernelRuntime | None) -> KernelRuntime:
    """``runtime``, or the default one."""
    return _DEFAULT if runtime is None else runtime

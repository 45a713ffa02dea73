"""Whether Triton is installed, whether its interpreter is on, and the lazy import of Triton itself (the switches
that choose the Triton paths are in :mod:`~lightning_zenft.kernels.runtime`).

Triton kernels run on CUDA tensors, or on CPU tensors when Triton's interpreter is on (``TRITON_INTERPRET=1`` in the
environment before the first kernel module is imported; Triton reads it when ``@triton.jit`` decorates a function).
Everything else runs the same math with torch ops, so every kernel works on any device.

The modules holding ``@triton.jit`` code (``_matmul_triton``, ``_dual_triton``, ``_nf4_triton``, ``_glu_triton``) are
imported only through ``triton_module``, never at package import: importing ``lightning_zenft`` needs no Triton.

Example::

    from lightning_zenft.kernels._triton import triton_installed, triton_module
    if triton_installed():
        matmul_kernels = triton_module("_matmul_triton")   # imports Triton and compiles nothing yet
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType


def interpret_mode() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton kernels then run (slowly) on CPU tensors, for tests."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def triton_installed() -> bool:
    """True when ``import triton`` would work (looked up once per process)."""
    return importlib.util.find_spec("triton") is not None


def require_triton() -> ModuleType:
    """``import triton``, or an error that says how to install it."""
    try:
        import triton
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "this lightning_zenft kernel needs Triton; install it with `pip install triton` "
            "(or `pip install lightning_zenft[kernels]`), or run on the torch path with set_triton_enabled(False)."
        ) from err
    return triton


def triton_module(name: str) -> ModuleType:
    """Import ``lightning_zenft.kernels.<name>`` (a module with ``@triton.jit`` code) on first use."""
    require_triton()
    return importlib.import_module(f"lightning_zenft.kernels.{name}")

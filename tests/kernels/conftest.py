"""Kernel tests run the Triton kernels on CPU through Triton's interpreter when there is no GPU.

Triton 3.x reads ``TRITON_INTERPRET`` when ``@triton.jit`` decorates a kernel, i.e. when the kernel module is first
imported; lightning_zenft imports its kernel modules lazily, so setting it here (before any test runs) is enough.
Outside the tests that ask for the Triton back end, the torch path runs (fast), so the whole suite is not slowed down.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from lightning_zenft.kernels import set_triton_enabled  # noqa: E402
from lightning_zenft.kernels._triton import triton_installed  # noqa: E402

set_triton_enabled(False)

# Kernel tests build CPU tensors; their Triton side runs under the interpreter. Where a GPU is present the interpreter
# is off (the compiled kernels are tested by test_fused_kernels_gpu.py), so the CPU Triton cases are skipped there.
_NO_CPU_TRITON = not triton_installed() or os.environ.get("TRITON_INTERPRET") != "1"
_WHY = "no triton" if not triton_installed() else "Triton on CPU tensors needs TRITON_INTERPRET=1 (a GPU is present)"
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(_NO_CPU_TRITON, reason=_WHY))]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run the test once on the torch path and once on the Triton path."""
    set_triton_enabled(request.param == "triton")
    try:
        yield request.param
    finally:
        set_triton_enabled(False)


@pytest.fixture
def triton_on() -> Iterator[None]:
    """The Triton path, for tests that only need it."""
    if _NO_CPU_TRITON:
        pytest.skip(_WHY)
    set_triton_enabled(True)
    try:
        yield
    finally:
        set_triton_enabled(False)

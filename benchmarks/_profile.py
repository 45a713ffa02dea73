"""Where a step's time goes: device kernels grouped by kind, from ``torch.profiler``, for the benchmarks' ``--profile``.

A missed target is explained by this table, not by a guess: the same grouping for ``ours`` and for the ceiling shows
which kind of kernel holds the gap (big GEMMs, the low-rank products, attention, element-wise ops, the optimizer).

    rows = profile_kernels(step, steps=2)          # [{"kernel": ..., "kind": ..., "calls": ..., "ms": ...}, ...]
    kinds = by_kind(rows)                          # {"gemm": ms per step, "attention": ..., ...}
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch

# First match wins; names are lower-cased kernel names as the profiler reports them. Triton kernels (ours, Liger's)
# are plain identifiers; PyTorch's own kernels are C++ names with "::" and template arguments.
KINDS: list[tuple[str, tuple[str, ...]]] = [
    ("lowrank-triton", ("_lowrank_matmul", "_dual_lowrank")),
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "splitk", "cublas", "aten::mm", "aten::addmm", "matmul")),
    ("triton", ()),
    ("optimizer", ("adam", "multi_tensor")),
    ("reduce", ("reduce", "sum", "norm")),
    ("copy", ("copy", "cat", "memcpy", "memset", "fill")),
    ("elementwise", ("elementwise", "vectorized", "unrolled")),
]


def kind_of(name: str) -> str:
    lower = name.lower()
    for kind, needles in KINDS:
        if kind == "triton":
            if "::" not in lower and "<" not in lower and "kernel" in lower:
                return kind
        elif any(n in lower for n in needles):
            return kind
    return "other"


def _is_step(event: object) -> bool:
    return str(getattr(event, "name", "")).startswith("Optimizer.")


class KernelProfile:
    """Start/stop profiling around any steps (e.g. from Trainer hooks); :meth:`stop` returns the kernel rows."""

    def __init__(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        self.cuda = torch.cuda.is_available()
        self._prof = profile(activities=[ProfilerActivity.CUDA] if self.cuda else [ProfilerActivity.CPU])

    def start(self) -> None:
        self._prof.__enter__()

    def stop(self, steps: int) -> list[dict]:
        """Stop; device kernels (top-level CPU ops without CUDA) with calls and milliseconds per step."""
        if self.cuda:
            torch.cuda.synchronize()
        self._prof.__exit__(None, None, None)
        totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
        for event in self._prof.events():
            if self.cuda and event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            if not self.cuda and (_is_step(event) or not (event.cpu_parent is None or _is_step(event.cpu_parent))):
                continue  # top-level CPU ops (those inside an optimizer step's closure too), each counted once
            totals[event.name][0] += 1
            totals[event.name][1] += event.time_range.elapsed_us()  # a kernel's time on the device
        rows = [
            dict(kernel=name[:120], kind=kind_of(name), calls=int(calls) // steps, ms=round(us / 1e3 / steps, 3))
            for name, (calls, us) in totals.items()
        ]
        return sorted(rows, key=lambda r: -r["ms"])


def profile_kernels(step: Callable[[], None], steps: int = 2) -> list[dict]:
    """Run ``step`` ``steps`` times under the profiler; the kernel rows of :meth:`KernelProfile.stop`."""
    prof = KernelProfile()
    prof.start()
    for _ in range(steps):
        step()
    return prof.stop(steps)


def by_kind(rows: list[dict]) -> dict[str, float]:
    """Milliseconds per step for each kind of kernel, largest first."""
    kinds: dict[str, float] = defaultdict(float)
    for row in rows:
        kinds[row["kind"]] += row["ms"]
    return {k: round(v, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])}


def format_profile(label: str, rows: list[dict], top: int = 12) -> str:
    """A short text table: the per-kind sums, then the ``top`` kernels."""
    lines = [f"profile of {label}: ms per step by kind: " + ", ".join(f"{k} {v:.2f}" for k, v in by_kind(rows).items())]
    for row in rows[:top]:
        lines.append(f"  {row['ms']:9.3f} ms  {row['calls']:5d}x  {row['kind']:<14} {row['kernel'][:90]}")
    return "\n".join(lines)

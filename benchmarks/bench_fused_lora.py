"""Microbenchmark: one LoRA projection, forward + backward, against the frozen base layer alone.

For each shape ``(tokens, in, out)`` it times, in one process and with the same input:

* ``base``: ``F.linear(x, W)`` with ``W`` frozen, ``x`` requiring grad (what the ceiling pays per layer);
* ``eager``: ``F.linear(x, W) + s * F.linear(F.linear(x, A), B)`` (what HF PEFT runs);
* ``fused``: :func:`lightning_zenft.kernels.fused_lora`, matmul back end ``auto`` (Triton epilogue where it is faster);
* ``fused-cublas``, ``fused-triton``, ``fused-tma``: the same on one back end each (cuBLAS only; the Triton epilogue
  GEMM; its TMA variant);
* with ``--nf4``: ``base-nf4`` (dequantize + ``F.linear``), ``fused-nf4``, and ``bnb-nf4`` (bitsandbytes'
  ``matmul_4bit``) when bitsandbytes is installed.

and prints milliseconds per forward + backward, the overhead over ``base`` (target: <= 10% at r = 16 on 4096x4096
and 4096x14336) and the memory kept for backward (MiB). ``--tiny`` runs small shapes on CPU as a smoke test (CPU
timings mean nothing).

    python benchmarks/bench_fused_lora.py                 # H100: 8192 tokens, r = 16, bf16
    python benchmarks/bench_fused_lora.py --nf4 --rank 64
    python benchmarks/bench_fused_lora.py --profile       # and each case's device time by kernel
    python benchmarks/bench_fused_lora.py --tiny
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _profile import by_kind, format_profile, profile_kernels  # noqa: E402

from lightning_zenft.kernels import (
    NF4Weight,
    dequantize_nf4,
    fused_lora,
    quantize_nf4,
    set_matmul_backend,
    set_triton_enabled,
)
from lightning_zenft.planning.measure import saved_tensor_bytes


def timed(fn: Callable[[], None], device: torch.device, warmup: int, reps: int) -> float:
    """Mean milliseconds of ``fn``."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) * 1e3 / reps


def saved_mib(forward: Callable[[], torch.Tensor], exclude: list[torch.Tensor]) -> float:
    """MiB the autograd graph holds for backward when one forward returns, not counting ``exclude`` (weights)."""
    _, held = saved_tensor_bytes(forward, exclude)
    return held / 2**20


def bench_shape(tokens: int, k: int, n: int, r: int, args: argparse.Namespace, device: torch.device) -> list[dict]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    x = torch.randn(tokens, k, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(n, k, device=device, dtype=dtype) / k**0.5
    a = (torch.randn(r, k, device=device, dtype=dtype) / k**0.5).requires_grad_()
    b = (torch.randn(n, r, device=device, dtype=dtype) * 0.01).requires_grad_()
    dy = torch.randn(tokens, n, device=device, dtype=dtype)
    s = 2.0

    def run(forward: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            forward().backward(dy)
            x.grad = a.grad = b.grad = None

        return step

    cases: dict[str, Callable[[], torch.Tensor]] = {
        "base": lambda: F.linear(x, w),
        "eager": lambda: F.linear(x, w) + F.linear(F.linear(x, a), b) * s,
        "fused": lambda: fused_lora(x, w, a, b, s),
    }
    backends = {"fused": "auto"}
    if device.type == "cuda":
        for name, backend in (("fused-cublas", "torch"), ("fused-triton", "triton"), ("fused-tma", "triton-tma")):
            cases[name] = lambda: fused_lora(x, w, a, b, s)
            backends[name] = backend
    if args.nf4:
        nf4: NF4Weight = quantize_nf4(w, dtype=dtype)
        cases["base-nf4"] = lambda: F.linear(x, dequantize_nf4(nf4).view(n, k))
        cases["fused-nf4"] = lambda: fused_lora(x, nf4, a, b, s)
        if device.type == "cuda":
            try:
                import bitsandbytes as bnb
                import bitsandbytes.functional as bnbf

                packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
                cases["bnb-nf4"] = lambda: bnb.matmul_4bit(x, packed.t(), quant_state=state)
            except ImportError:
                pass
    if args.cases:  # a subset (the base cases are kept: the overheads are measured against them)
        keep = set(args.cases.split(",")) | {"base", "base-nf4"}
        cases = {name: fn for name, fn in cases.items() if name in keep}
    rows: list[dict] = []
    ref_ms: dict[str, float] = {}
    for name, forward in cases.items():
        set_matmul_backend(backends.get(name, "auto"))
        ms = timed(run(forward), device, args.warmup, args.reps)
        if name.startswith("base"):
            ref_ms[name] = ms
        ref = ref_ms["base-nf4" if name.endswith("nf4") else "base"]
        row = dict(
            shape=f"{tokens}x{k}->{n}",
            r=r,
            case=name,
            ms=round(ms, 3),
            overhead_pct=None if name.startswith("base") else round(100 * (ms / ref - 1), 1),
            saved_mib=round(saved_mib(forward, exclude=[w, a, b]), 3),
        )
        if args.profile:
            kernels = profile_kernels(run(forward), steps=3)
            row.update(profile_by_kind=by_kind(kernels), profile=kernels[:12])
        rows.append(row)
    set_matmul_backend("auto")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192, help="rows of x (batch x sequence)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--shapes", default="4096x4096,4096x14336,14336x4096", help="in x out, comma separated")
    parser.add_argument("--nf4", action="store_true", help="also the 4-bit NF4 base")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test at small shapes")
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    parser.add_argument("--profile", action="store_true", help="also the device time of each case by kernel")
    parser.add_argument("--cases", default=None, help="only these cases, comma separated (e.g. eager,fused)")
    args = parser.parse_args()
    if args.tiny:
        device = torch.device("cpu")
        args.tokens, args.shapes, args.warmup, args.reps, args.rank = 64, "96x80,80x160", 1, 2, 4
    else:
        if not torch.cuda.is_available():
            raise SystemExit("this benchmark needs a CUDA GPU; run with --tiny for a CPU smoke test.")
        device = torch.device("cuda")
    set_triton_enabled(device.type == "cuda")
    rows = []
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        rows += bench_shape(args.tokens, k, n, args.rank, args, device)
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (timings meaningless)"
    print(f"fused_lora microbenchmark on {device_name}, forward + backward, r={args.rank}")
    print(f"| {'shape':<18} | {'case':<13} | {'ms':>9} | {'overhead vs base':>16} | {'saved for bwd MiB':>17} |")
    print(f"|{'-' * 20}|{'-' * 15}|{'-' * 11}|{'-' * 18}|{'-' * 19}|")
    for row in rows:
        over = "" if row["overhead_pct"] is None else f"{row['overhead_pct']:+.1f}%"
        print(
            f"| {row['shape']:<18} | {row['case']:<13} | {row['ms']:>9.3f} | {over:>16} | {row['saved_mib']:>17.3f} |"
        )
    for row in rows:
        if "profile" in row:
            print(format_profile(f"{row['case']} {row['shape']}", row["profile"], top=6))


if __name__ == "__main__":
    main()

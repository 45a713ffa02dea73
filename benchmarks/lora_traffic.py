"""Bytes moved and FLOPs of one LoRA projection's forward + backward, counted per operation, at real shapes, anywhere.

Runs the projection on fake tensors (no memory, no GPU) and records every aten operation autograd and the kernels
issue: its FLOPs (``2 M N K`` for a matrix product) and the bytes of every tensor it reads and writes (``addmm_`` with
``beta = 1`` reads its output too). Counts, not timings: they show which operations a LoRA step adds to the frozen
layer's two GEMMs, and a roofline bound (each operation at best ``max(FLOPs / peak, bytes / bandwidth)``) shows how
much of the 10% overhead budget they use up before any kernel inefficiency. The fused rows are the cuBLAS path of
``lowrank_matmul``; the Triton epilogue path drops the operations marked ``[epilogue]`` (their low-rank sum is added
in the big GEMM's epilogue instead); "one-pass dY" also counts ``dual_lowrank``, which reads ``dY`` once for both
``dY B`` and ``dY^T X A^T``.

    python benchmarks/lora_traffic.py                                  # 8192 tokens, r=16, the 8B shapes
    python benchmarks/lora_traffic.py --peak-tflops 790 --bandwidth-tbs 3.35 --ops
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_zenft.kernels import LoRAProjection, fused_lora, fused_lora_group, fused_lora_mlp, set_matmul_backend

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _shapes import layer_widths  # noqa: E402

Op = tuple[str, float, float, str]
MATMULS = {"mm", "addmm", "addmm_", "bmm", "baddbmm"}
FREE = {
    "new_empty",
    "empty",
    "empty_like",
    "t",
    "view",
    "detach",
    "split_with_sizes",
    "expand",
    "reshape",
    "_unsafe_view",
    "as_strided",
    "transpose",
}


class Counter(TorchDispatchMode):
    """Records ``(op, flops, bytes)`` for every aten operation that does work."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, float, float, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in FREE or func.namespace == "prim":
            return out
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        outs = [o for o in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(o, torch.Tensor)]
        if name.endswith("_") and outs and tensors and outs[0] is tensors[0]:
            outs = outs[:1]  # in place: the first argument is read and written
        nbytes = sum(t.numel() * t.element_size() for t in tensors + outs)
        flops = 0.0
        shapes = " ".join("x".join(map(str, t.shape)) for t in tensors)
        if name in MATMULS:
            a, b = tensors[-2], tensors[-1]
            flops = 2.0 * a.shape[-2] * a.shape[-1] * b.shape[-1] * (a.shape[0] if a.dim() == 3 else 1)
        self.ops.append((name, flops, float(nbytes), shapes))
        return out


def count(step: Callable[[dict], None], tensors: dict) -> list[tuple[str, float, float, str]]:
    counter = Counter()
    with counter:
        step(tensors)
    for t in tensors.values():
        t.grad = None  # the next path starts from empty gradients, as a training step does
    return counter.ops


def roofline_us(ops: list[tuple[str, float, float, str]], peak: float, bandwidth: float) -> float:
    return sum(max(f / peak, b / bandwidth) for _, f, b, _ in ops) * 1e6


def _dims(shapes: str) -> list[tuple[int, ...]]:
    return [tuple(int(v) for v in part.split("x")) for part in shapes.split()]


def is_epilogue(op: Op, r: int) -> bool:
    """A low-rank product ``P Q`` (inner dimension at most ``4 r``: one rank or a q/k/v group's) written to a full
    output: the term the Triton GEMM adds in its epilogue instead."""
    name, _, _, shapes = op
    dims = _dims(shapes)
    return name in ("mm", "addmm") and len(dims) >= 2 and dims[-2][-1] <= 4 * r and dims[-1][-1] > 4 * r


def one_pass_dy(ops: list[Op], m: int, r: int) -> list[Op]:
    """The ``dual_lowrank`` kernel: ``dY^T (X A^T)`` reads the ``dY`` tiles that ``dY B`` loaded, and writes and sums
    fp32 partials instead (``ceil(M / 256) x N x r`` floats, written once and read once)."""
    out = []
    for name, flops, nbytes, shapes in ops:
        dims = _dims(shapes)
        if name == "mm" and len(dims) == 2 and dims[0][1] == m and dims[1] == (m, dims[1][1]) and dims[1][1] <= r:
            n = dims[0][0]
            nbytes = nbytes - m * n * 2 + -(-m // 256) * n * dims[1][1] * 4 * 2
            shapes += " [one pass with dY B]"
        out.append((name, flops, nbytes, shapes))
    return out


def triton_paths(fused: list[Op], m: int, r: int) -> dict[str, list[Op]]:
    epilogue = [op for op in fused if not is_epilogue(op, r)]
    return {"fused, Triton epilogue": epilogue, "fused, Triton epilogue + one-pass dY": one_pass_dy(epilogue, m, r)}


def matmul_ops(ops: list[Op]) -> list[Op]:
    """The products and the small operations; the gated MLP's elementwise passes are left out: on a GPU both the
    frozen model (Liger's SwiGLU) and the fused MLP (its GLU kernel) run them as one forward and one backward kernel
    over the same tensors, and on fake tensors the torch fallback's many fp32 passes would be counted instead."""
    return [op for op in ops if op[0] in MATMULS or op[2] < 4 * 2**20]


def dora_report(k: int, n: int, m: int, r: int, peak: float, bw: float) -> None:
    """One DoRA projection: eager (``DoRALinear``, HF PEFT's numerics and operations) against ``fused_dora``."""
    from lightning_zenft.adapters import DoRALinear
    from lightning_zenft.kernels import fused_dora

    dtype = torch.bfloat16
    with FakeTensorMode():
        layer = DoRALinear(torch.nn.Linear(k, n, bias=False, dtype=dtype), r=r, alpha=2 * r)
        layer.base_layer.weight.requires_grad_(False)
        t = dict(x=torch.empty(m, k, dtype=dtype).requires_grad_(), dy=torch.empty(m, n, dtype=dtype))
        t |= {n_: p for n_, p in layer.named_parameters() if p.requires_grad}

        def eager(_: dict) -> None:
            layer(t["x"]).backward(t["dy"])

        def fused(_: dict) -> None:
            w, a, b = layer.base_layer.weight, layer.lora_A.weight, layer.lora_B.weight
            fused_dora(t["x"], w, a, b, layer.lora_magnitude_vector, layer.scaling).backward(t["dy"])

        def base(_: dict) -> None:
            F.linear(t["x"], layer.base_layer.weight).backward(t["dy"])

        results = {name: count(fn, t) for name, fn in (("base", base), ("eager DoRA", eager), ("fused DoRA", fused))}
    base_us = roofline_us(results["base"], peak, bw)
    for name, ops in results.items():
        us = roofline_us(ops, peak, bw)
        flops, nbytes = sum(o[1] for o in ops), sum(o[2] for o in ops)
        print(f"| {k} -> {n} | {name} | {len(ops)} | {flops / 1e9:,.0f} | {nbytes / 1e9:.2f} | {us:,.0f} | "
              f"{100 * (us / base_us - 1):+.1f}% |")  # fmt: skip


def layer_report(size: str, m: int, r: int, peak: float, bw: float) -> None:
    """One decoder layer's projections and gated MLP (attention, norms and the rest are the same in both): the
    products and small operations only (:func:`matmul_ops`)."""
    _, h, i, kv = layer_widths(size)
    dtype = torch.bfloat16
    with FakeTensorMode():
        t = dict(
            x=torch.empty(m, h, dtype=dtype).requires_grad_(),
            o_in=torch.empty(m, h, dtype=dtype).requires_grad_(),
            x2=torch.empty(m, h, dtype=dtype).requires_grad_(),
        )
        shapes = dict(q=(h, h), k=(kv, h), v=(kv, h), o=(h, h), gate=(i, h), up=(i, h), down=(h, i))
        w = {k: torch.empty(*v, dtype=dtype) for k, v in shapes.items()}
        a = {k: torch.empty(r, v[1], dtype=dtype).requires_grad_() for k, v in shapes.items()}
        b = {k: torch.empty(v[0], r, dtype=dtype).requires_grad_() for k, v in shapes.items()}
        dy = {k: torch.empty(m, shapes[k][0], dtype=dtype) for k in ("q", "k", "v", "o", "down")}

        def frozen(_: dict) -> None:
            outs = [F.linear(t["x"], w[k]) for k in ("q", "k", "v")] + [F.linear(t["o_in"], w["o"])]
            hidden = F.silu(F.linear(t["x2"], w["gate"])) * F.linear(t["x2"], w["up"])
            outs.append(F.linear(hidden, w["down"]))
            torch.autograd.backward(outs, [dy[k] for k in ("q", "k", "v", "o", "down")])

        def fused(_: dict) -> None:
            proj = {k: LoRAProjection(w[k], None, a[k], b[k], 2.0) for k in shapes}
            outs = list(fused_lora_group(t["x"], [proj["q"], proj["k"], proj["v"]]))
            outs.append(fused_lora(t["o_in"], w["o"], a["o"], b["o"], 2.0))
            outs.append(fused_lora_mlp(t["x2"], proj["gate"], proj["up"], proj["down"]))
            torch.autograd.backward(outs, [dy[k] for k in ("q", "k", "v", "o", "down")])

        leaves = {**t, **{f"a_{k}": v for k, v in a.items()}, **{f"b_{k}": v for k, v in b.items()}}
        results = {
            name: matmul_ops(count(fn, leaves))
            for name, fn in (("frozen (ceiling)", frozen), ("fused, cuBLAS path", fused))
        }
    results.update(triton_paths(results["fused, cuBLAS path"], m, r))
    base_us = roofline_us(results["frozen (ceiling)"], peak, bw)
    print(f"\nOne decoder layer of the {size} shape (h={h}, i={i}, k/v={kv}), its seven projections (GLU passes left "
          f"out, the same in both), {m} tokens, r={r}")  # fmt: skip
    print("| path | ops | GFLOP | GB moved | roofline us | over the frozen layer |")
    print("|---|---|---|---|---|---|")
    for name, ops in results.items():
        us = roofline_us(ops, peak, bw)
        flops, nbytes = sum(o[1] for o in ops), sum(o[2] for o in ops)
        print(f"| {name} | {len(ops)} | {flops / 1e9:,.0f} | {nbytes / 1e9:.2f} | {us:,.0f} | "
              f"{100 * (us / base_us - 1):+.1f}% |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--shapes", default="4096x4096,4096x14336,14336x4096", help="in x out, comma separated")
    parser.add_argument("--peak-tflops", type=float, default=800.0, help="bf16 matrix rate (H100, measured: ~800)")
    parser.add_argument("--bandwidth-tbs", type=float, default=3.35, help="memory bandwidth (H100 SXM: 3.35 TB/s)")
    parser.add_argument("--ops", action="store_true", help="list the fused path's operations")
    parser.add_argument("--layer", choices=["1b", "8b"], help="also one whole decoder layer of this model shape")
    parser.add_argument("--dora", action="store_true", help="also DoRA: eager (PEFT's operations) against fused")
    args = parser.parse_args()
    peak, bw = args.peak_tflops * 1e12, args.bandwidth_tbs * 1e12
    set_matmul_backend("torch")
    dtype, m, r = torch.bfloat16, args.tokens, args.rank
    steps: dict[str, Callable[[dict], None]] = {
        "base": lambda t: F.linear(t["x"], t["w"]).backward(t["dy"]),
        "eager (PEFT)": lambda t: (
            F.linear(t["x"], t["w"]) + F.linear(F.linear(t["x"], t["a"]), t["b"]) * 2.0
        ).backward(t["dy"]),
        "fused, cuBLAS path": lambda t: fused_lora(t["x"], t["w"], t["a"], t["b"], 2.0).backward(t["dy"]),
    }
    print(f"LoRA projection forward + backward, {m} tokens, r={r}, bf16; roofline at {args.peak_tflops:g} TFLOP/s and "
          f"{args.bandwidth_tbs:g} TB/s")  # fmt: skip
    print("| in -> out | path | ops | GFLOP | GB moved | roofline us | over base |")
    print("|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        with FakeTensorMode():
            tensors = dict(
                x=torch.empty(m, k, dtype=dtype).requires_grad_(),
                w=torch.empty(n, k, dtype=dtype),
                a=torch.empty(r, k, dtype=dtype).requires_grad_(),
                b=torch.empty(n, r, dtype=dtype).requires_grad_(),
                dy=torch.empty(m, n, dtype=dtype),
            )
            results = {name: count(step, tensors) for name, step in steps.items()}
        base_us = roofline_us(results["base"], peak, bw)
        fused = results["fused, cuBLAS path"]
        results.update(triton_paths(fused, m, r))
        for name, ops in results.items():
            us = roofline_us(ops, peak, bw)
            flops, nbytes = sum(o[1] for o in ops), sum(o[2] for o in ops)
            print(f"| {k} -> {n} | {name} | {len(ops)} | {flops / 1e9:,.0f} | {nbytes / 1e9:.2f} | {us:,.0f} | "
                  f"{100 * (us / base_us - 1):+.1f}% |")  # fmt: skip
        if args.ops:
            for op in fused:
                mark = " [epilogue]" if is_epilogue(op, r) else ""
                t = max(op[1] / peak, op[2] / bw) * 1e6
                print(f"    {op[0]:<10} {op[3]:<34} {op[1] / 1e9:8.1f} GFLOP {op[2] / 1e6:9.1f} MB {t:8.1f} us{mark}")
    if args.dora:
        print(f"\nDoRA projection forward + backward, {m} tokens, r={r}, bf16, no dropout")
        print("| in -> out | path | ops | GFLOP | GB moved | roofline us | over base |")
        print("|---|---|---|---|---|---|---|")
        for shape in args.shapes.split(","):
            k, n = (int(v) for v in shape.split("x"))
            dora_report(k, n, m, r, peak, bw)
    if args.layer:
        layer_report(args.layer, m, r, peak, bw)
    set_matmul_backend("auto")


if __name__ == "__main__":
    main()

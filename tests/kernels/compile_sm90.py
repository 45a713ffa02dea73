"""Compile every Triton kernel of lightning_zenft for the H100 (sm_90) without a GPU; print one JSON line per build.

Triton ships ``ptxas``, so a kernel can be lowered to a cubin on any machine: this catches what the CPU interpreter
cannot (type and layout errors of the compiled path, shared-memory overflow, register spills) before a GPU run.
Run in a process without ``TRITON_INTERPRET`` (under the interpreter ``@triton.jit`` gives no compilable function):

    python tests/kernels/compile_sm90.py
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def build(
    name: str,
    fn: object,
    types: dict[str, str],
    constexprs: dict[str, object],
    warps: int,
    stages: int,
    aligned: tuple[str, ...] = (),
) -> dict:
    """Compile ``fn`` with pointer/scalar ``types`` by argument name; every other argument must be in ``constexprs``.

    As a launch specializes them: pointers and the integers in ``aligned`` are marked divisible by 16, and integers
    given in ``constexprs`` (unit strides) are constants.
    """
    names = fn.arg_names
    signature = {n: "constexpr" if n in constexprs else types.get(n, "constexpr") for n in names}
    missing = [n for n in names if signature[n] == "constexpr" and n not in constexprs]
    if missing:
        raise ValueError(f"{name}: no type or constexpr value for {missing}")
    consts = {(names.index(n),): v for n, v in constexprs.items()}
    div16 = [n for n in names if signature[n].startswith("*") or n in aligned]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in div16}
    src = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    kernel = triton.compile(src, target=TARGET, options={"num_warps": warps, "num_stages": stages})
    return dict(
        kernel=name,
        config={k: v for k, v in constexprs.items() if k.isupper()},
        warps=warps,
        stages=stages,
        shared_bytes=int(kernel.metadata.shared),
        wgmma=len(re.findall(r"wgmma\.mma_async", kernel.asm["ptx"])),
        tma_copies=len(re.findall(r"cp\.async\.bulk\.tensor", kernel.asm["ptx"])),
        **registers(kernel.asm["ptx"]),
    )


def registers(ptx: str) -> dict[str, int]:
    """Registers per thread and spilled bytes, from the bundled ``ptxas -v`` on the kernel's PTX."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(90).path, "-v", "--gpu-name=sm_90a", path, "-o", os.path.join(tmp, "kernel.cubin")]
        report = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", report)
    spills = [int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", report)]
    return dict(registers=int(regs.group(1)) if regs else -1, spill_bytes=sum(spills))


def matmul_builds() -> list[dict]:
    from lightning_zenft.kernels import _matmul_triton as mm

    kernel = mm._lowrank_matmul_kernel  # an Autotuner: .fn is the JITFunction, .configs the tuning space
    ints = ["M", "N", "K", "R", "M_BUCKET"] + [n for n in kernel.fn.arg_names if n.startswith("stride_")]
    types = {n: "*bf16" for n in kernel.fn.arg_names if n.endswith("_ptr")} | {n: "i32" for n in ints}
    # the forward's layout: x (M, K) and the output contiguous, w = W^T (a transposed view), p = x A^T, q = (s B)^T
    unit = dict(stride_xk=1, stride_wk=1, stride_pr=1, stride_qr=1, stride_c0n=1, stride_cn=1)
    aligned = tuple(n for n in ints if n not in unit)
    variants = ((True, True, False), (True, False, True), (False, False, False))
    out = []
    for i, cfg in enumerate(kernel.configs):  # every tuning config; the epilogue variants on the first
        for lowrank, bias, c0 in variants if i == 0 else ((True, True, True),):
            flags = dict(HAS_LOWRANK=lowrank, HAS_BIAS=bias, HAS_C0=c0, BLOCK_R=16, UPCAST=False)
            consts = dict(cfg.kwargs) | flags | unit
            out.append(build("lowrank_matmul", kernel.fn, types, consts, cfg.num_warps, cfg.num_stages, aligned))
    return out


def tma_builds() -> list[dict]:
    from lightning_zenft.kernels import _matmul_triton as mm

    kernel = mm._lowrank_matmul_tma_kernel
    fn = kernel.fn
    ints = ["M", "N", "K", "R", "M_BUCKET"] + [n for n in fn.arg_names if n.startswith("stride_")]
    unit = dict(stride_pr=1, stride_qr=1, stride_c0n=1, stride_cn=1)
    out = []
    for i, cfg in enumerate(kernel.configs):  # every tuning config with a (N, K) weight; the (K, N) one on the first
        bm, bn, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
        for w_nk in (True, False) if i == 0 else (True,):
            w_block = [bn, bk] if w_nk else [bk, bn]
            types = {"x_desc": f"tensordesc<bf16[{bm}, {bk}]>", "w_desc": f"tensordesc<bf16{w_block}>"}
            types |= {n: "*bf16" for n in fn.arg_names if n.endswith("_ptr")} | {n: "i32" for n in ints}
            flags = dict(W_NK=w_nk, HAS_LOWRANK=True, HAS_BIAS=True, HAS_C0=True, BLOCK_R=16, UPCAST=False)
            consts = dict(cfg.kwargs) | flags | unit
            aligned = tuple(n for n in ints if n not in unit)
            out.append(build("lowrank_matmul_tma", fn, types, consts, cfg.num_warps, cfg.num_stages, aligned))
    return out


def dual_builds() -> list[dict]:
    from lightning_zenft.kernels import _dual_triton as dual

    fn = dual._dual_lowrank_kernel
    types = {n: "*bf16" for n in ("dy_ptr", "b_ptr", "xa_ptr")} | {"p_ws_ptr": "*fp32", "g_ws_ptr": "*fp32"}
    types |= {n: "i32" for n in fn.arg_names if n in ("M", "N", "R", "N_PER_SPLIT") or n.startswith("stride_")}
    unit = dict(stride_dyn=1, stride_br=1, stride_xar=1)
    aligned = tuple(n for n in types if not n.endswith("_ptr") and n not in unit)
    out = []
    for block_m, block_n, warps, stages in dual.CONFIGS:
        for block_r in (16, 64):
            consts = dict(UPCAST=False, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r) | unit
            out.append(build("dual_lowrank", fn, types, consts, warps, stages, aligned))
    return out


def elementwise_builds() -> list[dict]:
    from lightning_zenft.kernels import _glu_triton as glu
    from lightning_zenft.kernels import _nf4_triton as nf4

    out = []
    for act in sorted(set(glu.ACT_CODES.values())):
        fwd = {"g_ptr": "*bf16", "u_ptr": "*bf16", "h_ptr": "*bf16", "numel": "i32"}
        out.append(build("glu_fwd", glu._glu_fwd_kernel, fwd, dict(ACT=act, BLOCK=1024), 4, 1))
        bwd = {n: "*bf16" for n in ("dh_ptr", "g_ptr", "u_ptr", "dg_ptr", "du_ptr")} | {"numel": "i32"}
        out.append(build("glu_bwd", glu._glu_bwd_kernel, bwd, dict(ACT=act, BLOCK=1024), 4, 1))
    for nested in (False, True):
        types = {
            "packed_ptr": "*u8",
            "absmax_ptr": "*u8" if nested else "*fp32",
            "code_ptr": "*fp32",
            "absmax2_ptr": "*fp32",
            "code2_ptr": "*fp32",
            "out_ptr": "*bf16",
            "numel": "i32",
            "offset": "fp32",
            "blocksize": "i32",
            "blocksize2": "i32",
        }
        out.append(build("nf4_dequant", nf4._nf4_dequant_kernel, types, dict(NESTED=nested, BLOCK=1024), 4, 1))
    return out


def main() -> None:
    from lightning_zenft.kernels import _matmul_triton as mm

    print(json.dumps(dict(kernel="tuning", configs=len(mm._lowrank_matmul_kernel.configs))), flush=True)
    for row in matmul_builds() + tma_builds() + dual_builds() + elementwise_builds():
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

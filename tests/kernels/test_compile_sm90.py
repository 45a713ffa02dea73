"""Every Triton kernel compiles for the H100 (sm_90) on this machine, within shared memory and without spills.

The CPU interpreter runs the kernels' math but not their compiled form; Triton's bundled ``ptxas`` lowers them to a
cubin without a GPU, so a kernel that would fail to compile, overflow shared memory or spill registers on the GPU
fails here first. ``compile_sm90.py`` (beside this file) does the builds in a process without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

H100_SHARED_BYTES = 227 * 1024  # the most dynamic shared memory one block may use on sm_90


@pytest.fixture(scope="module")
def builds() -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    script = Path(__file__).with_name("compile_sm90.py")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_every_kernel_compiles_for_sm90(builds: list[dict]) -> None:
    kinds = {b["kernel"] for b in builds}
    gemms = {"lowrank_matmul", "lowrank_matmul_tma", "dual_lowrank"}
    assert kinds == {"tuning", "glu_fwd", "glu_bwd", "nf4_dequant"} | gemms
    for b in builds[1:]:
        if b["kernel"] in gemms:
            assert b["wgmma"] > 0, f"{b['kernel']} {b['config']}: no Hopper wgmma instruction"
        assert (b["tma_copies"] > 0) == (b["kernel"] == "lowrank_matmul_tma"), f"{b['kernel']}: TMA copies"
    tuning = next(b["configs"] for b in builds if b["kernel"] == "tuning")
    tiles = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")
    built = {tuple(b["config"][k] for k in tiles) + (b["warps"], b["stages"])
             for b in builds if b["kernel"] == "lowrank_matmul"}  # fmt: skip
    assert len(built) == tuning >= 4, "every autotuning config of the GEMM is compiled"


def test_no_kernel_spills_or_overflows_shared_memory(builds: list[dict]) -> None:
    for b in builds[1:]:
        where = f"{b['kernel']} {b['config']} warps={b['warps']} stages={b['stages']}"
        assert b["spill_bytes"] == 0, f"{where}: spills {b['spill_bytes']} bytes ({b['registers']} registers)"
        assert 0 < b["registers"] <= 255, where
        assert b["shared_bytes"] <= H100_SHARED_BYTES, f"{where}: {b['shared_bytes']} bytes of shared memory"

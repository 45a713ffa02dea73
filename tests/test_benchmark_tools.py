"""The tools that turn GPU benchmark output into verdicts: kernel classification, memory budget, met/MISSED lines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

from _profile import by_kind, kind_of  # noqa: E402
from record_results import memory_budget_gib  # noqa: E402


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("_lowrank_matmul_kernel", "lowrank-triton"),
        ("_lowrank_matmul_tma_kernel", "lowrank-triton"),
        ("_dual_lowrank_kernel", "lowrank-triton"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_execute_kernel__5x_cublas", "gemm"),
        ("nvjet_tst_128x256_64x4_1x2_h_bz_coopB_TNN", "gemm"),
        ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits>", "attention"),
        ("_rms_norm_forward_kernel", "triton"),
        (
            "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>",
            "elementwise",
        ),
        ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
        ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float>>", "reduce"),
    ],
)
def test_kernels_are_classified_by_kind(name: str, kind: str) -> None:
    assert kind_of(name) == kind


def test_by_kind_sums_per_kind_largest_first() -> None:
    rows = [dict(kind="gemm", ms=2.0), dict(kind="triton", ms=0.5), dict(kind="gemm", ms=1.0)]
    assert list(by_kind(rows).items()) == [("gemm", 3.0), ("triton", 0.5)]


def test_memory_budget_matches_the_targets_of_the_issue() -> None:
    # ceiling + Liger peaks of the reference run (9.1 and 26.8 GiB) plus the budget give the stated ~13.5 and ~34 GiB
    one_b = 9.1 + memory_budget_gib("1b", 4, 2048)
    eight_b = 26.8 + memory_budget_gib("8b", 2, 2048)
    assert 13.0 < one_b < 13.6
    assert 33.5 < eight_b < 34.5
    # the input copies dominate: 22 layers x (3 x 2048 + 5632) x 8192 tokens x 2 bytes
    assert memory_budget_gib("1b", 4, 2048) == pytest.approx(22 * 11776 * 8192 * 2 / 2**30, rel=0.06)


def _record(tmp_path: Path, ours_tok: int, ours_peak: float) -> str:
    def mode(name: str, tok: int, peak: float) -> dict:
        return dict(mode=name, tok_s=tok, peak_gib=peak, n_train=1, loss=1.0, profile_by_kind={"gemm": 1000 / tok})

    ours = mode("ours", ours_tok, ours_peak) | {"matmul_choices": {"mm M<=8192 w(2048, 5632) r=16 bfloat16": "tma"}}
    run = dict(device="gpu", torch="x", date="d", size="1b", quant="none", batch=4, seq=2048, results=[
        ours, mode("peft", 30_000, 27.8), mode("ceiling_liger", 90_000, 9.1),
    ])  # fmt: skip
    (tmp_path / "e2e-1b.json").write_text(json.dumps(run))
    micro = [
        dict(shape="8192x4096->4096", r=16, case="base", ms=1.0, overhead_pct=None, saved_mib=0.0),
        dict(shape="8192x4096->4096", r=16, case="fused", ms=1.12, overhead_pct=12.0, saved_mib=64.0),
    ]
    (tmp_path / "micro.jsonl").write_text("\n".join(json.dumps(r) for r in micro))
    cmd = [sys.executable, str(BENCH / "record_results.py"), str(tmp_path)]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def test_record_results_states_each_verdict(tmp_path: Path) -> None:
    out = _record(tmp_path, ours_tok=85_000, ours_peak=12.0)
    assert "Throughput: ours = 94.4% of ceiling_liger (target >= 90%: met)" in out
    assert "(target: met)" in out
    assert "2.83x tokens/s" in out
    assert "<= 10%: MISSED" in out  # the micro row at +12%
    assert "| gemm |" in out  # the profile gap table
    assert "- mm M<=8192 w(2048, 5632) r=16 bfloat16: tma" in out  # which back end won
    out = _record(tmp_path, ours_tok=70_000, ours_peak=20.0)
    assert "target >= 90%: MISSED" in out
    assert "(target: MISSED)" in out

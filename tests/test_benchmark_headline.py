"""The GPU quick plan's headline table (`record_results.py --headline`, `run_gpu.sh quick`) from the files it writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from zenft_testing import child_env

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
from record_results import memory_budget_gib  # noqa: E402


def write_runs(folder: Path) -> None:
    micro = [
        dict(shape="8192x4096->4096", r=16, case="base", ms=1.0, overhead_pct=None, saved_mib=0.0),
        dict(shape="8192x4096->4096", r=16, case="fused", ms=1.08, overhead_pct=8.0, saved_mib=64.0),
        dict(shape="8192x4096->14336", r=16, case="base", ms=3.0, overhead_pct=None, saved_mib=0.0),
        dict(shape="8192x4096->14336", r=16, case="fused", ms=3.36, overhead_pct=12.0, saved_mib=64.0),
    ]
    (folder / "micro.jsonl").write_text("\n".join(json.dumps(r) for r in micro))
    results = [dict(mode="ours", tok_s=85_000, peak_gib=12.0), dict(mode="ceiling_liger", tok_s=90_000, peak_gib=9.1),
               dict(mode="peft", tok_s=30_000, peak_gib=27.8)]  # fmt: skip
    run = dict(device="gpu", torch="x", date="d", size="1b", quant="none", batch=4, seq=2048, results=results)
    (folder / "e2e-1b.json").write_text(json.dumps(run))
    (folder / "quick-tests.xml").write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="21" failures="1" errors="0" skipped="0">'
        "</testsuite></testsuites>"
    )


def test_headline_states_each_figure_and_verdict(tmp_path: Path) -> None:
    write_runs(tmp_path)
    cmd = [sys.executable, str(BENCH / "record_results.py"), str(tmp_path), "--headline"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 1  # the 8B run is missing
    rows = json.loads((tmp_path / "headline.json").read_text())
    assert [r["verdict"] for r in rows[:2]] == ["met", "MISSED"]  # +8% and +12% against <= 10%
    throughput, memory, peft, missing_8b, tests = rows[2:]
    assert throughput["verdict"] == "met" and f"{100 * 85_000 / 90_000:.1f}% of ceiling_liger" in throughput["figure"]
    budget = 9.1 + memory_budget_gib("1b", 4, 2048)
    assert memory["verdict"] == "met" and f"peak <= {budget:.1f} GiB" in memory["target"]
    assert peft["figure"].startswith(f"{85_000 / 30_000:.2f}x tokens/s, {12.0 / 27.8:.2f}x memory")
    assert missing_8b["figure"] == "not run (ours, ceiling missing)"
    assert (tests["figure"], tests["verdict"]) == ("20 passed, 1 failed", "MISSED")
    for row in rows:  # the printed table holds the same rows
        assert f"| {row['figure']} | {row['verdict']} |" in proc.stdout


@pytest.mark.slow
def test_quick_plan_keeps_to_its_deadline_and_still_prints_the_table(tmp_path: Path) -> None:
    """With no time left every part is skipped, the table says "not run", and $OUT holds at most 8 files."""
    env = child_env(OUT=str(tmp_path), QUICK_SECONDS="0")
    proc = subprocess.run(["bash", str(BENCH / "run_gpu.sh"), "quick"], capture_output=True, text=True, env=env)
    assert proc.returncode != 0
    assert proc.stdout.count("skipped (time)") == 4
    rows = json.loads((tmp_path / "headline.json").read_text())
    assert rows and all(r["figure"].startswith("not run") for r in rows)
    assert len(list(tmp_path.iterdir())) <= 8  # what a device run brings back from $OUT

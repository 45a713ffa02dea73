"""`examples/compare_methods.py` on a short run: one row per method, the counts `count_parameters` gives, its errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from zenft_testing import child_env

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "compare_methods.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=child_env(),
                          timeout=600)  # fmt: skip


@pytest.mark.slow
def test_rows_hold_each_methods_counts_and_measurements(tmp_path):
    from lightning_zenft import CausalLMModule, IA3Config, LoRAConfig, count_parameters, inject_adapters

    out = tmp_path / "rows.json"
    done = _run("--steps", "3", "--methods", "lora,ia3", "--json", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["method"] for r in rows] == ["lora", "ia3"]
    for row, config in zip(rows, [LoRAConfig(r=8, alpha=16), IA3Config()], strict=True):
        module = CausalLMModule()
        inject_adapters(module.model, config)
        trainable, total = count_parameters(module)
        assert (row["trainable"], row["share_pct"]) == (trainable, pytest.approx(100 * trainable / total))
        assert row["steps"] == 3 and row["tokens_per_s"] > 0 and row["task_val_loss"] > 0
    assert f"| lora | `LoRA(r=8, alpha=16)` | 0.003 | {rows[0]['trainable']:,} |" in done.stdout  # the printed table


@pytest.mark.parametrize(("args", "message"), [(["--steps", "1"], "--steps 1: at least 2"),
                                               (["--methods", "lora,qlora"], "unknown methods ['qlora']"),
                                               (["--methods", ","], "unknown methods ','")])  # fmt: skip
def test_bad_arguments_are_named(args, message):
    done = _run(*args)
    assert done.returncode == 2 and message in done.stderr

"""The main job (`examples/finetune_default.py`): its report, on a two-step run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from zenft_testing import child_env

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "finetune_default.py"


@pytest.mark.slow
def test_main_job_reports_accuracy_and_says_where_the_adapter_is_once(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, str(SCRIPT), "--max-steps", "2", "--eval-prompts", "4", "--out", str(out)]
    env = child_env(PYTHONPATH=os.pathsep.join(filter(None, [str(SCRIPT.parents[1]), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout
    assert text.count("saved to") == 1 and f"adapter saved to {out / 'adapter'}" in text
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    # exact match before and after on 4 held-out prompts, one of each of the four kinds of record
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("exact match"))
    assert "/4 held-out prompts (" in line and line.count("/1") == 4
    assert text.count("expected '") == 8  # four samples before, four after

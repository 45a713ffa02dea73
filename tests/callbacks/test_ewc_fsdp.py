"""EWC under FSDP2 on 2 CPU processes (gloo) equals one process: Fisher, penalties, weights, and a resume; under DDP
the ranks' Fishers are averaged."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from zenft_testing import child_env

SCRIPT = Path(__file__).with_name("fsdp_penalty_run.py")


def one_process() -> dict:
    spec = importlib.util.spec_from_file_location("fsdp_penalty_run", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    threads = torch.get_num_threads()
    try:
        return {"full": script.run(1, lora=False), "lora": script.run(1, lora=True)}
    finally:
        torch.set_num_threads(threads)


def launch(devices: int, out: Path) -> dict:
    env = child_env(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(devices), str(out)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(out, weights_only=False)


@pytest.mark.slow
def test_two_process_fsdp2_equals_one_process(tmp_path):
    one = one_process()
    two = launch(2, tmp_path / "two.pt")
    for mode in ("full", "lora"):
        a, b = one[mode], two[mode]
        assert b["penalties"] == pytest.approx(a["penalties"], rel=1e-5, abs=1e-9), mode
        assert a["penalties"][-1] > 0
        for name, value in a["fisher"].items():  # gathered from the two shards
            torch.testing.assert_close(b["fisher"][name], value, rtol=1e-5, atol=1e-12)
        for name, (row, col) in a["factors"].items():
            torch.testing.assert_close(b["factors"][name][0], row, rtol=1e-5, atol=1e-12)
            torch.testing.assert_close(b["factors"][name][1], col, rtol=1e-5, atol=1e-12)
        assert a["params"].keys() == b["params"].keys()
        for name, value in a["params"].items():
            torch.testing.assert_close(b["params"][name], value, rtol=1e-5, atol=1e-6)
    # 2 steps, a distributed checkpoint (EWC's state in its metadata), 1 more step: the same as 3 straight steps
    resumed, straight = two["resumed"], two["full"]
    assert resumed["penalties"] == straight["penalties"][-1:]
    for name, value in straight["params"].items():
        assert torch.equal(resumed["params"][name], value), name
    # DDP, rank r estimating on its own batch: every rank holds the token-weighted mean of the two Fishers
    from prevention_testing import general_batches, pretrained_model

    from lightning_zenft.regularizers import fisher_diagonal

    per_rank = [fisher_diagonal(pretrained_model(), general_batches(n=4, seed=3 + r)) for r in (0, 1)]
    assert per_rank[0].tokens == per_rank[1].tokens
    for name, value in two["ddp"].items():
        inner = name.removeprefix("model.")
        want = 0.5 * (per_rank[0].diagonal[inner] + per_rank[1].diagonal[inner])
        torch.testing.assert_close(value, want, rtol=1e-5, atol=1e-12)

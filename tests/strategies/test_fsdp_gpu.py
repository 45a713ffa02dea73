"""FSDP1Strategy (CUDA only) and FSDP2Strategy's CUDA-only paths on one GPU, against the same run without a strategy."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from zenft_testing import child_env

SCRIPT = Path(__file__).with_name("fsdp_gpu_run.py")
pytestmark = [pytest.mark.gpu, pytest.mark.slow]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("fsdp-gpu")
    env = child_env(PYTHONPATH=os.pathsep.join(sys.path))
    command = [sys.executable, str(SCRIPT), str(root)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return {"root": root, **torch.load(root / "results.pt", weights_only=False)}


@pytest.mark.parametrize("name", ["fsdp1", "fsdp2"])
def test_lora_under_the_strategy_equals_no_strategy_and_resumes_exactly(run, name):
    entry = run[name]
    assert entry["straight"] == pytest.approx(run["plain"], rel=1e-4)
    for kind in ("sharded", "full"):
        assert entry[kind]["first"] == entry["straight"][:2]
        assert entry[kind]["resumed"] == entry["straight"][2:]
    heavy = entry["bf16_offload_ac"]  # bf16 gathers, CPU offload, activation checkpointing together
    assert heavy == pytest.approx(entry["straight"], rel=2e-2)


def test_fsdp1_units_are_uniform(run):
    assert run["fsdp1"]["mixed_units"] == [] and run["fsdp1"]["units"] == 2 + 28  # blocks + lora_A/lora_B


@pytest.mark.parametrize("name", ["fsdp1", "fsdp2"])
def test_save_adapter_writes_plain_names_and_whole_tensors(run, name):
    saved = load_file(run["root"] / f"{name}-adapter" / "adapter_model.safetensors")
    params = run[name]["params"]
    assert len(saved) == len(params) == 28
    for key, value in params.items():
        assert torch.equal(saved["base_model.model." + key.removeprefix("model.")], value), key


def test_full_finetune_under_fsdp1_equals_no_strategy(run):
    assert run["full"]["fsdp1"] == pytest.approx(run["full"]["plain"], rel=1e-4)


def test_fused_kernels_under_fsdp2_on_cuda(run):
    fused = run["fused"]
    assert fused["warnings"] == [] and len(fused["applied"]["lora"]) == 14
    assert fused["losses"] == pytest.approx(run["fsdp2"]["straight"], rel=1e-3)

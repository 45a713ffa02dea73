"""QLoRA under FSDP2 on two CPU processes (gloo) equals one process, with adapter-only checkpoints that resume."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from zenft_testing import child_env

pytest.importorskip("bitsandbytes", reason="the 4-bit layers are bitsandbytes'")

JOB = Path(__file__).with_name("fsdp2_qlora_job.py")


def _job_module():
    spec = importlib.util.spec_from_file_location("fsdp2_qlora_job", JOB)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_qlora_fsdp2_two_processes_equal_one_and_resume_from_adapter_only_checkpoints(tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    env = child_env(PYTHONPATH=os.pathsep.join([str(JOB.parents[2]), os.environ.get("PYTHONPATH", "")]))
    with socket.socket() as sock:  # a free port for the rendezvous (the machine may run other jobs)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [torchrun, "--nproc_per_node=2", f"--master_port={port}", str(JOB), str(tmp_path / "fsdp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / "fsdp" / f"rank{r}.json").read_text()) for r in (0, 1)]
    reference = _job_module().single_process_run(tmp_path / "single")

    assert ranks[0]["base"] == "ShardedLinear4bit"
    # each rank's loss is the mean over its half of the batch: their mean is the one-process loss
    mean_losses = [(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"], strict=True)]
    torch.testing.assert_close(torch.tensor(mean_losses), torch.tensor(reference["losses"]), rtol=1e-5, atol=1e-5)
    for name, value in reference["weights"].items():
        for rank in ranks:  # gathered on both ranks
            torch.testing.assert_close(torch.tensor(rank["weights"][name]), torch.tensor(value), rtol=1e-4, atol=1e-5)

    saved = torch.load(ranks[0]["checkpoint"], weights_only=False)
    assert set(saved["state_dict"]) == set(reference["weights"])  # adapters only: no 4-bit base
    assert saved["NF4Precision"]["quantization"]["mode"] == "nf4"
    for rank in ranks:
        assert rank["first_losses"] == rank["losses"][:2]
        assert rank["resumed_losses"] == rank["losses"][2:]  # bit-exact
        for name, value in rank["weights"].items():
            assert rank["resumed_weights"][name] == value, name
        assert "sharded by FSDP2 before NF4Precision quantized it" in rank["sharded_first_error"]
        assert "convert_module(self)` before `fully_shard`" in rank["sharded_first_error"]

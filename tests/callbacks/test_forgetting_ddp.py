"""ForgettingMonitor on 2 CPU processes (gloo): each rank scores its shard of each probe, the results are reduced.

Two ranks with 4 rows per batch take the same SGD steps (gradients averaged) as one process with 8, so the 2-process
runs (DDP, and FSDP2 through Lightning's ModelParallelStrategy) measure the models one process measures: the baseline
to float64 rounding, later steps to float32 rounding. Every rank must hold the same history, and a stop must happen
on both ranks at the same step with one checkpoint written. The probes have 7 rows and 5 questions, so the shards
are uneven and padded (a sharded model needs the same number of forward passes on every rank).
"""

from __future__ import annotations

import json
import os
import socket
import warnings
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from forgetting_testing import DumpHistory, InOrderCounter, distributed_monitor, trainer
from lightning.pytorch.strategies import ModelParallelStrategy
from zenft_testing import drop_session_env

from lightning_zenft import LoRA


def _fit(root: Path, devices: int) -> None:
    module = InOrderCounter(devices)
    torch.manual_seed(0)  # LoRA's A init, the same on every rank (DDP would broadcast rank 0's weights anyway)
    strategy = "ddp" if devices > 1 else "auto"
    callbacks = [LoRA(r=4, alpha=8), distributed_monitor(), DumpHistory(root)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = trainer(root, callbacks, max_steps=6, devices=devices, strategy=strategy, use_distributed_sampler=False)
        fit.fit(module)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("one")
    _fit(root, devices=1)
    return json.loads((root / "rank0.json").read_text())


def _check(one: dict, root: Path) -> None:
    ranks = [json.loads((root / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]  # every rank holds the same reduced numbers and took the same action
    two = ranks[0]
    assert [r["step"] for r in two["history"]] == [r["step"] for r in one["history"]]
    assert two["history"][-1]["action"] == one["history"][-1]["action"] == "stop"
    assert two["global_step"] == one["global_step"] < 6
    for a, b in zip(one["history"], two["history"], strict=True):
        tol = 1e-12 if a["step"] == 0 else 1e-5
        for probe, metrics in a["metrics"].items():
            for name, value in metrics.items():
                assert b["metrics"][probe][name] == pytest.approx(value, rel=tol, abs=tol), (a["step"], probe, name)
    baseline_one, baseline_two = one["history"][0]["metrics"], two["history"][0]["metrics"]
    assert baseline_two["general"]["accuracy"] == baseline_one["general"]["accuracy"]  # counts: exact
    assert baseline_two["counting_choice"]["accuracy"] == baseline_one["counting_choice"]["accuracy"]
    stops = list((root / "forgetting").iterdir())
    assert [s.name for s in stops] == [f"forgetting-stop-step={two['global_step']}.ckpt"]  # one, renamed into place


def _launcher_env(rank: int, port: int) -> None:
    # the variables a launcher sets, so Lightning starts no processes of its own
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "NODE_RANK": "0"}
    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)


def _ddp_rank(rank: int, port: int, root: str) -> None:
    _launcher_env(rank, port)
    _fit(Path(root), devices=2)


def _launch(worker, root: Path) -> None:
    # spawned, not forked: a child forked from a parent whose OpenMP pool is running can hang in its first parallel op
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    drop_session_env()  # the workers inherit os.environ (restored after the test)
    mp.start_processes(worker, args=(port, str(root)), nprocs=2, join=True, start_method="spawn")


@pytest.mark.slow
def test_ddp_two_processes_measure_what_one_process_measures(tmp_path, one_process):
    _launch(_ddp_rank, tmp_path)
    _check(one_process, tmp_path)
    assert (
        torch.load(tmp_path / "forgetting" / os.listdir(tmp_path / "forgetting")[0], weights_only=False)["global_step"]
        == one_process["global_step"]
    )


class ShardedCounter(InOrderCounter):
    """The counting model sharded with FSDP2: ``fully_shard`` on each decoder layer and on the whole model."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)


def _fsdp_rank(rank: int, port: int, root: str) -> None:
    _launcher_env(rank, port)
    module = ShardedCounter(2)
    torch.manual_seed(0)  # after building the module: the same LoRA init as the one-process run
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    callbacks = [LoRA(r=4, alpha=8), distributed_monitor(), DumpHistory(Path(root))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = trainer(Path(root), callbacks, max_steps=6, devices=2, strategy=strategy, use_distributed_sampler=False)
        fit.fit(module)


@pytest.mark.slow
def test_fsdp2_two_processes_measure_what_one_process_measures(tmp_path, one_process):
    _launch(_fsdp_rank, tmp_path)
    _check(one_process, tmp_path)

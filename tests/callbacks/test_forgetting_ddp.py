"""ForgettingMonitor under DDP (2 CPU processes over gloo): each rank scores its shard, the results are reduced.

Two ranks with 4 rows per batch see the same gradients (averaged) as one process with 8, so the 2-process run and the
1-process run measure the same models: the measurements must agree (the baseline to float64 rounding, later steps to
float32 rounding of the averaged gradients), every rank must hold the same history, and a stop must happen on both
ranks at the same step with one checkpoint written.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from forgetting_testing import TASK_STRIDE, CounterLM, stride_rows, trainer
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, DistributedSampler

from lightning_zenft import ForgettingMonitor, LoRA
from lightning_zenft.data.probes import ChoiceItem, ChoiceProbe, LMProbe


def _probes() -> dict:
    g = torch.Generator().manual_seed(3)
    items = []
    for q in range(5):  # 5 questions over 2 ranks: shards of 3 and 2 + a placeholder
        context = stride_rows(1, 1, seed=20 + q, seq=4)[0].tolist()
        right = [(context[-1] + 1) % 32]
        wrong = [[int(t)] for t in torch.randint(0, 32, (2,), generator=g) if int(t) != right[0]]
        items.append(ChoiceItem(context, [right, *wrong], answer=0))
    return {
        "general": LMProbe.from_rows(list(stride_rows(7, 1, seed=5)), batch_size=2),  # 7 rows: 4 and 3 + 1
        "counting_choice": ChoiceProbe(items, batch_size=2),
    }


class InOrderCounter(CounterLM):
    """Rank r takes rows r, r + w, ... in order (Lightning's own sampler would shuffle), so the two ranks' batches
    of 4 together are the one process's batch of 8."""

    def train_dataloader(self):
        loader = super().train_dataloader()
        world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = DistributedSampler(loader.dataset, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(loader.dataset, batch_size=self.batch_size, sampler=sampler)


class DumpHistory(Callback):
    def __init__(self, directory) -> None:
        self.directory = directory

    def on_fit_end(self, trainer, pl_module) -> None:
        (monitor,) = [cb for cb in trainer.callbacks if isinstance(cb, ForgettingMonitor)]
        out = {
            "history": monitor.history,
            "global_step": trainer.global_step,
            "checkpoint": str(monitor.stop_checkpoint),
        }
        (self.directory / f"rank{trainer.global_rank}.json").write_text(json.dumps(out))


def _run(root, devices: int, batch_size: int) -> None:
    monitor = ForgettingMonitor(
        probes=_probes(),
        task_probes={"task": LMProbe.from_rows(list(stride_rows(6, TASK_STRIDE, seed=6)), batch_size=4)},
        every_n_steps=1,
        max_drop=30.0,
        on_exceed="stop",
    )
    strategy = "ddp_fork" if devices > 1 else "auto"
    # SGD: Adam's first steps (g / |g|) would turn float rounding in near-zero gradients into +-lr updates
    module = InOrderCounter(lr=1.0, n_train=64, batch_size=batch_size, optimizer="sgd")
    torch.manual_seed(0)  # LoRA's A init; forked ranks inherit this state, and DDP broadcasts rank 0's weights
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = trainer(
            root, [LoRA(r=4, alpha=8), monitor, DumpHistory(root)], max_steps=6, devices=devices, strategy=strategy
        )
        fit.fit(module)


@pytest.mark.slow
def test_two_processes_measure_what_one_process_measures(tmp_path):
    _run(tmp_path / "one", devices=1, batch_size=8)
    _run(tmp_path / "two", devices=2, batch_size=4)
    one = json.loads((tmp_path / "one" / "rank0.json").read_text())
    ranks = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in range(2)]
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
    checkpoints = list((tmp_path / "two" / "forgetting").iterdir())
    assert [c.name for c in checkpoints] == [f"forgetting-stop-step={two['global_step']}.ckpt"]
    assert torch.load(checkpoints[0], weights_only=False)["global_step"] == two["global_step"]

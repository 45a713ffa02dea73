"""Two processes (gloo, CPU) each updating their share give the metrics one process computes on all the data."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from zenft_testing import drop_session_env

from lightning_zenft.metrics import (
    BackwardTransfer,
    ChoiceAccuracy,
    Forgetting,
    NextTokenAccuracy,
    Perplexity,
    TokenKL,
)


def _data():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 6, 11, generator=g)  # 7 rows: the shards are uneven (4 and 3)
    reference = torch.randn(7, 6, 11, generator=g)
    labels = torch.randint(0, 11, (7, 6), generator=g)
    labels[2, :3] = -100
    scores = torch.randn(9, 4, generator=g)
    scores[3, 3] = float("-inf")
    answers = torch.randint(0, 3, (9,), generator=g)
    values = torch.randn(9, generator=g)
    correct = torch.randint(0, 2, (3, 3, 5), generator=g)
    return logits, reference, labels, scores, answers, values, correct


def _compute(rows: slice) -> dict[str, float]:
    logits, reference, labels, scores, answers, values, correct = _data()
    ppl, acc, kl = Perplexity(), NextTokenAccuracy(), TokenKL()
    choice, forget, bwt = ChoiceAccuracy(), Forgetting(baseline=0.5), BackwardTransfer(num_tasks=3)
    for i in range(logits.shape[0])[rows]:  # one row per update, as a probe's batches would come
        ppl.update(logits[i : i + 1], labels[i : i + 1])
        acc.update(logits[i : i + 1], labels[i : i + 1])
        kl.update(logits[i : i + 1], reference[i : i + 1], labels[i : i + 1])
    choice.update(scores[rows], answers[rows])
    forget.update(values[rows])
    for i in range(3):
        for j in range(3):
            bwt.update(i, j, correct[i, j][rows])
    metrics = {"ppl": ppl, "acc": acc, "kl": kl, "choice": choice, "forget": forget, "bwt": bwt}
    return {name: m.compute().item() for name, m in metrics.items()}


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        result = _compute(slice(rank, None, 2))
    finally:
        dist.destroy_process_group()
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_reduction_equals_one_process(tmp_path):
    # spawned, not forked: a child forked from a parent whose OpenMP pool is running can hang in its first parallel op
    drop_session_env()  # the workers inherit os.environ (restored after the test)
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    single = _compute(slice(None))
    assert results[0] == results[1]  # every rank sees the reduced value
    for name, value in single.items():
        assert results[0][name] == pytest.approx(value, rel=1e-12, abs=1e-12), name
    assert results[0]["acc"] == single["acc"] and results[0]["choice"] == single["choice"]  # counts: exact

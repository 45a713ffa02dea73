"""MergeAdapters: the merged model exported at the end of fit, gated on a forgetting monitor's within_limits()."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from merging_helpers import logits
from zenft_testing import TinyLM, load_base, make_trainer, token_batch

from lightning_zenft import LoRA, MergeAdapters


class StandInMonitor(Callback):
    """A test double of a forgetting monitor (another component): it only answers within_limits()."""

    def __init__(self, within: bool) -> None:
        self.within = within
        self.asked = 0

    def within_limits(self) -> bool:
        self.asked += 1
        return self.within


def test_fit_ends_with_the_merged_model_exported(tmp_path):
    module = TinyLM("gpt2")
    merge = MergeAdapters("merged", dtype="float32")
    make_trainer(tmp_path, [LoRA(r=4, alpha=8), merge]).fit(module)
    assert merge.report is not None and merge.skipped is None
    assert merge.report.out == tmp_path / "merged"
    ids = token_batch()
    merged = logits(load_base(tmp_path / "merged"), ids)
    torch.testing.assert_close(merged, logits(module.model.eval(), ids), atol=1e-5, rtol=1e-5)
    assert any(type(m).__name__ == "LoRALinear" for m in module.model.modules())  # the trained model is unchanged


@pytest.mark.parametrize("within", [True, False])
def test_merges_only_within_the_monitors_limits(tmp_path, within):
    monitor = StandInMonitor(within)
    merge = MergeAdapters(str(tmp_path / "merged"), only_within_limits=True)
    trainer = make_trainer(tmp_path, [LoRA(r=2), monitor, merge], max_steps=1)
    if within:
        trainer.fit(TinyLM())
    else:
        with pytest.warns(UserWarning, match="not merging: StandInMonitor reported the model outside"):
            trainer.fit(TinyLM())
    assert monitor.asked == 1
    assert (tmp_path / "merged").is_dir() == within
    assert (merge.skipped is None) == within and (merge.report is not None) == within


def test_a_missing_monitor_is_an_error_at_setup(tmp_path):
    module = TinyLM()
    trainer = make_trainer(tmp_path, [LoRA(r=2), MergeAdapters(only_within_limits=True)])
    with pytest.raises(ValueError, match=r"needs a forgetting monitor .* within_limits\(\)"):
        trainer.fit(module)
    assert module.losses == []  # refused before any training step


def test_sharded_strategies_are_refused_at_setup(tmp_path):
    from lightning.pytorch.strategies import ModelParallelStrategy

    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=ModelParallelStrategy(), logger=False,
                        default_root_dir=tmp_path)  # fmt: skip
    with pytest.raises(ValueError, match="under ModelParallelStrategy each process holds a shard.*zenft merge"):
        MergeAdapters().setup(trainer, TinyLM(), "fit")


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"dtype": "fp8"}, "dtype='fp8'"), ({"quantized": "keep"}, "quantized='keep'")]
)
def test_option_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MergeAdapters(**kwargs)

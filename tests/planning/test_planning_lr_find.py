"""Learning-rate finder centred on a recommendation, against a direct Tuner.lr_find run."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.tuner import Tuner
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

from lightning_zenft.planning.lr import lr_find_from_recommendation
from lightning_zenft.planning.recommend import recommend


class Regression(L.LightningModule):
    def __init__(self, learning_rate: float | None = 0.05) -> None:
        super().__init__()
        if learning_rate is not None:
            self.learning_rate = learning_rate
        self.net = nn.Linear(8, 1)

    @override
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=getattr(self, "learning_rate", 1e-3))


def loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=generator)
    y = x @ torch.randn(8, 1, generator=generator) + 0.1 * torch.randn(512, 1, generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=16)


def trainer(root) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )


def test_sweep_is_centred_and_matches_direct_tuner(tmp_path):
    centre, span = 0.01, 10.0
    torch.manual_seed(0)
    module = Regression(learning_rate=centre)
    suggested, finder = lr_find_from_recommendation(
        trainer(tmp_path / "a"), module, learning_rate=centre, span=span, num_training=20, train_dataloaders=loader()
    )
    lrs = finder.results["lr"]
    assert len(lrs) == 20
    assert min(lrs) >= centre / span * (1 - 1e-9) and max(lrs) <= centre * span * (1 + 1e-9)
    assert suggested == finder.suggestion()
    assert module.learning_rate == suggested  # written back

    torch.manual_seed(0)
    reference_module = Regression(learning_rate=centre)
    reference = Tuner(trainer(tmp_path / "b")).lr_find(
        reference_module, train_dataloaders=loader(), min_lr=centre / span, max_lr=centre * span, num_training=20
    )
    assert finder.results["lr"] == pytest.approx(reference.results["lr"])
    assert finder.results["loss"] == pytest.approx(reference.results["loss"])
    assert suggested == reference.suggestion()


def test_centre_from_module_or_recommendation(tmp_path):
    module = Regression(learning_rate=0.02)
    # 12 points are too few for a suggestion (the finder skips the first 10): the centre comes back, with a warning.
    with pytest.warns(UserWarning, match="could not suggest a rate from 12 points"):
        suggested, finder = lr_find_from_recommendation(
            trainer(tmp_path), module, span=4.0, num_training=12, train_dataloaders=loader()
        )
    assert suggested == 0.02
    assert min(finder.results["lr"]) >= 0.005 * (1 - 1e-9) and max(finder.results["lr"]) <= 0.08 * (1 + 1e-9)
    rec = recommend("7B", "ner", 20_000)
    module = Regression(learning_rate=None)
    suggested, finder = lr_find_from_recommendation(
        trainer(tmp_path), module, learning_rate=rec, num_training=20, train_dataloaders=loader()
    )
    assert rec.learning_rate / 10 * (1 - 1e-9) <= min(finder.results["lr"]) <= suggested
    assert suggested <= max(finder.results["lr"]) <= rec.learning_rate * 10 * (1 + 1e-9)
    assert not hasattr(module, "learning_rate")  # nothing to write back to: update_attr defaults to False


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="no numeric `learning_rate` or `lr`"):
        lr_find_from_recommendation(trainer(tmp_path), Regression(learning_rate=None))
    with pytest.raises(ValueError, match=r"span=1\.0.*min_lr=0\.1"):
        lr_find_from_recommendation(trainer(tmp_path), Regression(), span=1.0, min_lr=0.1)

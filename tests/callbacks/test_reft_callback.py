"""The LoReFT callback in a real Trainer: what trains, R orthonormal after fitting, adapter-only checkpoints, exact
resume, adoption by a second Trainer, and the saved file."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from zenft_testing import TinyLM, make_trainer

from lightning_zenft import LoReFT, LoReFTLayer, find_adapters, load_adapter, save_adapter


def _run(tmp_path, max_steps, ckpt_path=None, every=None, **kwargs):
    torch.manual_seed(0)
    module = TinyLM("llama")
    callbacks = [LoReFT(r=2, dropout=0.1, first_positions=2, last_positions=1, **kwargs)]
    if every:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=every, save_top_k=-1))
    trainer = make_trainer(tmp_path, callbacks, max_steps=max_steps, enable_checkpointing=bool(every))
    trainer.fit(module, ckpt_path=ckpt_path)
    return module


def test_fit_trains_the_interventions_keeps_r_orthonormal_and_saves(tmp_path):
    module = _run(tmp_path, max_steps=3)
    layers = dict(find_adapters(module))
    assert list(layers) == ["model.model.layers.0", "model.model.layers.1"]
    assert all(isinstance(layer, LoReFTLayer) for layer in layers.values())
    trained = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trained == {f"{n}.{p}" for n, layer in layers.items() for p in layer.adapter_params()}
    for layer in layers.values():
        rotation = layer.rotate.weight
        torch.testing.assert_close(rotation @ rotation.T, torch.eye(2), atol=1e-5, rtol=0)
    out = save_adapter(module.model, tmp_path / "reft")  # relative to the transformers model, as a file should be
    fresh = TinyLM("llama").model
    load_adapter(fresh, out)
    fresh.eval()  # new modules are built in training mode, whatever the model's mode (their dropout is on)
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    mask = (ids != 0).long()
    module.eval()
    with torch.no_grad():
        want = module.model(input_ids=ids, attention_mask=mask).logits
        got = fresh(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.slow  # four short fits
def test_checkpoint_holds_interventions_only_and_resume_equals_uninterrupted(tmp_path):
    straight = _run(tmp_path / "a", max_steps=6)
    first = _run(tmp_path / "b", max_steps=4, every=4)  # an epoch is 4 steps: the data resumes where it stopped
    (ckpt,) = list((tmp_path / "b" / "ckpt").glob("*.ckpt"))
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    assert set(state) == {n for n, p in first.named_parameters() if p.requires_grad}
    assert any(k.endswith("rotate.parametrizations.weight.original") for k in state)
    resumed = _run(tmp_path / "c", max_steps=6, ckpt_path=ckpt)
    assert first.losses == straight.losses[:4]
    assert resumed.losses == straight.losses[4:]  # bit-exact, dropout masks included
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(RuntimeError, match="(?i)differ"):
        _run(tmp_path / "d", max_steps=6, ckpt_path=ckpt, target_modules=["layers.1"])


def test_a_second_trainer_adopts_the_interventions(tmp_path):
    module = TinyLM("gpt2")
    make_trainer(tmp_path, [LoReFT()], max_steps=1).fit(module)
    before = dict(find_adapters(module))
    make_trainer(tmp_path, [LoReFT()], limit_val_batches=1).validate(module, verbose=False)
    assert dict(find_adapters(module)) == before
    with pytest.raises(RuntimeError, match="first_positions=1 \\(wanted 2\\)"):
        make_trainer(tmp_path, [LoReFT(first_positions=2)], limit_val_batches=1).validate(module, verbose=False)


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_fit_under_lightning_precision(tmp_path, precision):
    module = TinyLM("llama")
    make_trainer(tmp_path, [LoReFT(r=4)], max_steps=2, precision=precision).fit(module)
    layer = module.model.model.layers[0]
    dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32
    assert layer.learned_source.weight.dtype == layer.rotate.parametrizations.weight.original.dtype == dtype
    rotation = layer.rotate.weight  # computed in float32 from the stored factors
    assert rotation.dtype == torch.float32
    torch.testing.assert_close(rotation @ rotation.T, torch.eye(4), atol=1e-5, rtol=0)
    assert len(module.losses) == 2 and all(torch.isfinite(torch.tensor(module.losses)))

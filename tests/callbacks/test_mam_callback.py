"""MAM: a parallel adapter on the feed-forward modules plus prefix tuning, built from those two methods' configs."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from zenft_testing import TinyLM, make_trainer, tiny_model, token_batch

from lightning_zenft import (
    MAMAdapter,
    MAMConfig,
    ParallelAdapterConfig,
    PrefixKV,
    PrefixTuningConfig,
    SaveAdapter,
    find_adapters,
    inject_adapters,
    load_adapter,
    merge_adapters,
)
from lightning_zenft.adapters.bottleneck import ParallelAdapterLayer


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def test_mam_is_its_two_parts(tmp_path):
    """MAM's modules are exactly a parallel adapter on every MLP and one prefix; with equal values, the model equals
    one given the two methods separately."""
    model = tiny_model("llama")
    names = inject_adapters(model, MAMConfig(num_virtual_tokens=4, bottleneck_size=8))
    layers = dict(find_adapters(model))
    assert names == ["model.layers.0.mlp", "model.layers.1.mlp", "prefix_tuning"] == list(layers)
    assert isinstance(layers["prefix_tuning"], PrefixKV)
    assert all(isinstance(layers[n], ParallelAdapterLayer) for n in names[:2])
    _randomize(model)
    reference = tiny_model("llama")
    inject_adapters(reference, ParallelAdapterConfig(bottleneck_size=8, scaling=4.0))
    inject_adapters(reference, PrefixTuningConfig(num_virtual_tokens=4))
    mine = {n: p for n, p in model.named_parameters() if p.requires_grad}
    theirs = dict(reference.named_parameters())
    with torch.no_grad():
        for name, value in mine.items():
            theirs[name].copy_(value)
    ids = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=0, rtol=0)
    with pytest.raises(TypeError, match="ParallelAdapterLayer, PrefixKV adapters cannot be merged"):
        merge_adapters(model)


def test_mam_settings_are_checked_by_its_parts():
    with pytest.raises(ValueError, match=r"invalid MAMConfig: .*reduction_factor=-1 .*num_virtual_tokens=0 must"):
        MAMConfig(num_virtual_tokens=0, reduction_factor=-1)
    with pytest.raises(ValueError, match=r"target_modules='all-linear' selects linear layers"):
        MAMAdapter(target_modules="all-linear")


def _run(tmp_path, max_steps, ckpt_path=None, every=None):
    torch.manual_seed(0)
    module = TinyLM("llama")
    callbacks = [MAMAdapter(num_virtual_tokens=3, bottleneck_size=4, dropout=0.1), SaveAdapter("adapter")]
    if every:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=every, save_top_k=-1))
    trainer = make_trainer(tmp_path, callbacks, max_steps=max_steps, enable_checkpointing=bool(every))
    trainer.fit(module, ckpt_path=ckpt_path)
    return module


@pytest.mark.slow
def test_resume_equals_uninterrupted_and_the_file_loads_back(tmp_path):
    straight = _run(tmp_path / "a", max_steps=8)
    first = _run(tmp_path / "b", max_steps=4, every=4)
    (ckpt,) = list((tmp_path / "b" / "ckpt").glob("*.ckpt"))
    saved = torch.load(ckpt, weights_only=False)
    assert set(saved["state_dict"]) == {n for n, p in first.named_parameters() if p.requires_grad}
    resumed = _run(tmp_path / "c", max_steps=8, ckpt_path=ckpt)
    assert resumed.losses == straight.losses[4:]
    fresh = TinyLM("llama")
    load_adapter(fresh.model, tmp_path / "a" / "adapter")  # our own format: both parts' modules, as trained
    ids = token_batch()
    fresh.eval(), straight.eval()  # the adapter's dropout off
    with torch.no_grad():
        torch.testing.assert_close(fresh.model(ids).logits, straight.model(ids).logits, atol=0, rtol=0)
        greedy = straight.model.generate(ids[:1, :6], max_new_tokens=4, do_sample=False, pad_token_id=0)
        again = fresh.model.generate(ids[:1, :6], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(greedy, again)

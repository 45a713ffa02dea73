"""The BottleneckAdapter and ParallelAdapter callbacks in a real Trainer: what trains, the optimizer, adapter-only
checkpoints, exact resume, adoption by a second Trainer, and the adapter file."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from zenft_testing import TinyLM, make_trainer, token_batch

from lightning_zenft import (
    BottleneckAdapter,
    BottleneckAdapterLayer,
    ParallelAdapter,
    ParallelAdapterConfig,
    SaveAdapter,
    count_parameters,
    find_adapters,
    load_adapter,
)
from lightning_zenft.adapters.reft import LoReFTLayer


def test_fit_trains_only_the_adapters_and_norms_when_asked(tmp_path):
    module = TinyLM("llama")
    callback = BottleneckAdapter(bottleneck_size=4, trainable_norms=True)
    trainer = make_trainer(tmp_path, [callback, SaveAdapter("adapter")], max_steps=3)
    trainer.fit(module)
    layers = dict(find_adapters(module))
    assert list(layers) == callback.targets and len(layers) == 4
    assert all(isinstance(layer, BottleneckAdapterLayer) for layer in layers.values())
    assert all(layer.adapter_up.weight.abs().sum() > 0 for layer in layers.values())
    trained = {n for n, p in module.named_parameters() if p.requires_grad}
    own = {f"{n}.{p}" for n, layer in layers.items() for p in layer.adapter_params()}
    norms = {n for n in trained - own}
    assert own <= trained and norms and all("norm" in n for n in norms)
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in module.parameters() if p.requires_grad}
    assert (callback.trainable_params, callback.total_params) == count_parameters(module)
    fresh = TinyLM("llama")  # the saved file (our format) gives the trained model back
    load_adapter(fresh.model, tmp_path / "adapter")
    ids = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(fresh.model(ids).logits, module.model(ids).logits, atol=0, rtol=0)


def _run(tmp_path, max_steps, ckpt_path=None, every=None, **kwargs):
    torch.manual_seed(0)
    module = TinyLM("gpt2")
    callbacks = [ParallelAdapter(bottleneck_size=4, dropout=0.1, target_modules="all", **kwargs)]
    if every:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=every, save_top_k=-1))
    trainer = make_trainer(tmp_path, callbacks, max_steps=max_steps, enable_checkpointing=bool(every))
    trainer.fit(module, ckpt_path=ckpt_path)
    return module


@pytest.mark.slow  # four short fits
def test_checkpoint_holds_adapters_only_and_resume_equals_uninterrupted(tmp_path):
    straight = _run(tmp_path / "a", max_steps=6)
    first = _run(tmp_path / "b", max_steps=4, every=4)  # an epoch is 4 steps: the data resumes where it stopped
    (ckpt,) = list((tmp_path / "b" / "ckpt").glob("*.ckpt"))
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    assert set(state) == {n for n, p in first.named_parameters() if p.requires_grad}
    assert state and all(".adapter_" in k for k in state)
    resumed = _run(tmp_path / "c", max_steps=6, ckpt_path=ckpt)
    assert first.losses == straight.losses[:4]
    assert resumed.losses == straight.losses[4:]  # bit-exact, dropout masks included
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(RuntimeError, match="(?i)differ"):
        _run(tmp_path / "d", max_steps=6, ckpt_path=ckpt, scaling=2.0)


def test_a_second_trainer_adopts_the_adapters_or_refuses_others(tmp_path):
    module = TinyLM("llama")
    make_trainer(tmp_path, [ParallelAdapter(target_modules="all")], max_steps=1).fit(module)
    before = dict(find_adapters(module))
    make_trainer(tmp_path, [ParallelAdapter(target_modules="all")], limit_val_batches=1).validate(module, verbose=False)
    assert dict(find_adapters(module)) == before
    with pytest.raises(RuntimeError, match="holds a parallel_adapter adapter, not bottleneck"):
        make_trainer(tmp_path, [BottleneckAdapter()], limit_val_batches=1).validate(module, verbose=False)
    with pytest.raises(RuntimeError, match="adapted layers are not in the plan"):
        make_trainer(tmp_path, [ParallelAdapter()], limit_val_batches=1).validate(module, verbose=False)
    assert not any(isinstance(m, LoReFTLayer) for m in module.modules())


def test_arguments_come_from_the_config():
    params = inspect.signature(ParallelAdapter).parameters
    fields = {f.name for f in dataclasses.fields(ParallelAdapterConfig)}
    assert set(params) == fields | {"save_full_state_dict"}
    assert params["target_modules"].default == "mlp" and params["scaling"].default == 4.0
    assert inspect.signature(BottleneckAdapter).parameters["target_modules"].default == "all"
    with pytest.raises(TypeError, match="got unknown arguments \\['r'\\]"):
        BottleneckAdapter(r=4)
    with pytest.raises(ValueError, match="non_linearity='swish'"):
        ParallelAdapter(non_linearity="swish")


def test_fit_in_bf16(tmp_path):
    module = TinyLM("llama")
    make_trainer(tmp_path, [ParallelAdapter(target_modules="all")], max_steps=2, precision="bf16-true").fit(module)
    layers = [layer for _, layer in find_adapters(module)]
    assert all(layer.adapter_up.weight.dtype == torch.bfloat16 for layer in layers)
    assert all(layer.adapter_up.weight.abs().sum() > 0 for layer in layers)
    assert len(module.losses) == 2 and all(torch.isfinite(torch.tensor(module.losses)))

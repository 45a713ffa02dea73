"""The LoRA/DoRA callbacks inside a real Trainer: injection, freezing, optimizer, checkpoints and resume."""

from __future__ import annotations

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from zenft_testing import TinyLM, make_trainer

from lightning_zenft import DoRA, LoRA, count_parameters, find_adapters
from lightning_zenft.adapters import DoRALinear


def _base_weights(module):
    return {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}


def test_fit_trains_only_adapters_and_filters_optimizer(tmp_path):
    module = TinyLM("llama")
    lora = LoRA(r=4, alpha=8, target_modules="all-linear")
    trainer = make_trainer(tmp_path, [lora], max_steps=3)
    trainer.fit(module)
    layers = dict(find_adapters(module))
    assert len(layers) == 14 and lora.targets == list(layers)
    frozen = _base_weights(module)
    fresh = TinyLM("llama")
    fresh_params = dict(fresh.named_parameters())
    for name, value in frozen.items():
        torch.testing.assert_close(value, fresh_params[name.replace(".base_layer", "")].detach(), atol=0, rtol=0)
    assert all(layer.lora_B.weight.abs().sum() > 0 for layer in layers.values())
    optimized = [p for group in trainer.optimizers[0].param_groups for p in group["params"]]
    assert {id(p) for p in optimized} == {id(p) for p in module.parameters() if p.requires_grad}
    assert (lora.trainable_params, lora.total_params) == count_parameters(module)
    assert lora.trainable_params == sum(p.numel() for p in optimized)


def test_parameter_counts_are_logged(tmp_path):
    module = TinyLM("gpt2")
    lora = LoRA(r=2, target_modules="attention")
    trainer = make_trainer(tmp_path, [lora], max_steps=1, logger=CSVLogger(tmp_path))
    trainer.fit(module)
    hparams = yaml.safe_load((tmp_path / "lightning_logs" / "version_0" / "hparams.yaml").read_text())
    assert hparams["zenft/trainable_params"] == lora.trainable_params == count_parameters(module)[0]
    assert hparams["zenft/total_params"] == count_parameters(module)[1]


def test_injects_after_configure_model(tmp_path):
    module = TinyLM("qwen2", build_in_configure_model=True)
    trainer = make_trainer(tmp_path, [LoRA(r=2, target_modules=["q_proj", "v_proj"])], max_steps=2)
    trainer.fit(module)
    assert {n.rsplit(".", 1)[-1] for n, _ in find_adapters(module)} == {"q_proj", "v_proj"}
    assert len(module.losses) == 2


def test_optimizer_without_adapters_is_an_error(tmp_path):
    class HeadOnly(TinyLM):
        def configure_optimizers(self):
            return torch.optim.SGD([self.model.lm_head.weight], lr=0.1)

    with pytest.raises(RuntimeError, match="optimizer does not hold .* adapter parameters"):
        make_trainer(tmp_path, [LoRA(r=2)], max_steps=1).fit(HeadOnly("llama"))


def test_dora_callback_trains_magnitude(tmp_path):
    module = TinyLM("llama")
    make_trainer(tmp_path, [DoRA(r=2, target_modules="attention")], max_steps=2).fit(module)
    layers = [layer for _, layer in find_adapters(module)]
    assert layers and all(isinstance(layer, DoRALinear) for layer in layers)
    norms = [torch.linalg.norm(layer.base_layer.weight, dim=1) for layer in layers]
    assert any(not torch.allclose(layer.lora_magnitude_vector, n) for layer, n in zip(layers, norms, strict=True))


def test_validate_after_fit_reuses_adapters(tmp_path):
    module = TinyLM("llama")
    lora = LoRA(r=2)
    trainer = make_trainer(tmp_path, [lora], max_steps=1)
    trainer.fit(module)
    n_layers = len(list(find_adapters(module)))
    trainer.validate(module, verbose=False)
    assert len(list(find_adapters(module))) == n_layers
    other = make_trainer(tmp_path, [LoRA(r=2)], limit_val_batches=1)  # a second Trainer adopts the same adapters
    other.validate(module, verbose=False)
    assert len(list(find_adapters(module))) == n_layers
    with pytest.raises(RuntimeError, match="already holds adapters that differ"):
        make_trainer(tmp_path, [DoRA(r=2)], limit_val_batches=1).validate(module, verbose=False)


def _run(tmp_path, max_steps, ckpt_path=None, every=None, dropout=0.1, **lora_kwargs):
    torch.manual_seed(0)
    module = TinyLM("llama")
    callbacks = [LoRA(r=4, alpha=8, dropout=dropout, **lora_kwargs)]
    if every:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=every, save_top_k=-1))
    trainer = make_trainer(tmp_path, callbacks, max_steps=max_steps, enable_checkpointing=bool(every))
    trainer.fit(module, ckpt_path=ckpt_path)
    return module


def test_checkpoint_holds_adapters_only_and_resume_equals_uninterrupted(tmp_path):
    straight = _run(tmp_path / "a", max_steps=8)
    first = _run(tmp_path / "b", max_steps=4, every=4)
    (ckpt,) = list((tmp_path / "b" / "ckpt").glob("*.ckpt"))
    saved = torch.load(ckpt, weights_only=False)
    assert saved["state_dict"] and all(".lora_" in k for k in saved["state_dict"])
    assert set(saved["state_dict"]) == {n for n, p in first.named_parameters() if p.requires_grad}
    resumed = _run(tmp_path / "c", max_steps=8, ckpt_path=ckpt)
    assert first.losses == straight.losses[:4]
    assert resumed.losses == straight.losses[4:]  # bit-exact
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_full_state_dict_option(tmp_path):
    module = _run(tmp_path, max_steps=2, every=2, save_full_state_dict=True)
    (ckpt,) = list((tmp_path / "ckpt").glob("*.ckpt"))
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    assert set(state) == set(module.state_dict())


def test_resume_with_other_settings_is_an_error(tmp_path):
    _run(tmp_path / "a", max_steps=2, every=2)
    (ckpt,) = list((tmp_path / "a" / "ckpt").glob("*.ckpt"))
    with pytest.raises(RuntimeError, match="(?i)missing|differ|unexpected key"):
        _run(tmp_path / "b", max_steps=4, ckpt_path=ckpt, target_modules=["q_proj"])


def test_bad_rank_argument():
    with pytest.raises(ValueError, match="r='big'"):
        LoRA(r="big")  # type: ignore[arg-type]


def test_validate_from_adapter_only_checkpoint(tmp_path):
    trained = _run(tmp_path / "a", max_steps=3, every=3, dropout=0.0)
    (ckpt,) = list((tmp_path / "a" / "ckpt").glob("*.ckpt"))
    trainer = make_trainer(tmp_path / "v", [LoRA(r=4, alpha=8)], limit_val_batches=1)
    (expected,) = trainer.validate(trained, verbose=False)
    fresh = TinyLM("llama")
    trainer = make_trainer(tmp_path / "w", [LoRA(r=4, alpha=8)], limit_val_batches=1)
    (restored,) = trainer.validate(fresh, ckpt_path=ckpt, verbose=False)
    assert restored["val_loss"] == expected["val_loss"]
    trainer = make_trainer(tmp_path / "x", [LoRA(r=2, alpha=8)], limit_val_batches=1)
    with pytest.raises(RuntimeError, match=r"settings differ from the checkpoint's \(saved, now\): \{'r': \(4, 2\)\}"):
        trainer.validate(TinyLM("llama"), ckpt_path=ckpt, verbose=False)


def test_auto_rank_follows_the_recommendation(tmp_path):
    from lightning_zenft import resolve_lora_rank_auto

    module = TinyLM("llama")
    lora = LoRA(r="auto", target_modules="attention")
    make_trainer(tmp_path, [lora], max_steps=1).fit(module)
    n_params = sum(p.numel() for p in TinyLM("llama").parameters())
    expected = resolve_lora_rank_auto(n_params, 16)  # TinyLM trains on 16 sequences
    assert {layer.r for _, layer in find_adapters(module)} == {expected}
    assert lora.config.alpha == 2 * expected


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_fit_under_lightning_precision(tmp_path, precision):
    module = TinyLM("llama")
    make_trainer(tmp_path, [LoRA(r=4)], max_steps=3, precision=precision).fit(module)
    layers = [layer for _, layer in find_adapters(module)]
    expected = torch.bfloat16 if precision == "bf16-true" else torch.float32
    assert all(layer.lora_A.weight.dtype == expected for layer in layers)
    assert all(layer.lora_B.weight.abs().sum() > 0 for layer in layers)
    assert len(module.losses) == 3 and all(torch.isfinite(torch.tensor(module.losses)))

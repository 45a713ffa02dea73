"""The PromptTuning, PrefixTuning and PTuning callbacks in a real Trainer: training, checkpoints, resume, export."""

from __future__ import annotations

import peft
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from zenft_testing import TinyLM, make_trainer, token_batch

from lightning_zenft import PrefixTuning, PromptTuning, PTuning, SaveAdapter, count_parameters, find_adapters

METHODS = {
    "prompt": (lambda: PromptTuning(num_virtual_tokens=4), "prompt_tuning"),
    "prefix": (lambda: PrefixTuning(num_virtual_tokens=4, prefix_projection=True), "prefix_tuning"),
    "p-lstm": (
        lambda: PTuning(num_virtual_tokens=4, encoder_type="lstm", encoder_hidden_size=8, encoder_dropout=0.2),
        "p_tuning",
    ),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_fit_trains_only_the_virtual_tokens(tmp_path, method):
    make_callback, attach = METHODS[method]
    module = TinyLM("llama")
    callback = make_callback()
    trainer = make_trainer(tmp_path, [callback], max_steps=3)
    trainer.fit(module)
    assert callback.targets == [f"model.{attach}"]
    ((name, adapter),) = find_adapters(module)
    assert name == f"model.{attach}"
    fresh = dict(TinyLM("llama").named_parameters())
    trained = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trained == {f"{name}.{p}" for p in adapter.adapter_params()}
    for n, p in module.named_parameters():
        if n not in trained:
            assert torch.equal(p, fresh[n]), n  # the base is untouched
    optimized = [p for group in trainer.optimizers[0].param_groups for p in group["params"]]
    assert {id(p) for p in optimized} == {id(p) for p in module.parameters() if p.requires_grad}
    assert (callback.trainable_params, callback.total_params) == count_parameters(module)
    assert len(module.losses) == 3 and all(torch.isfinite(torch.tensor(module.losses)))


def _run(tmp_path, method, max_steps, ckpt_path=None, every=None):
    torch.manual_seed(0)
    module = TinyLM("llama")
    callbacks = [METHODS[method][0]()]
    if every:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=every, save_top_k=-1))
    trainer = make_trainer(tmp_path, callbacks, max_steps=max_steps, enable_checkpointing=bool(every))
    trainer.fit(module, ckpt_path=ckpt_path)
    return module


@pytest.mark.parametrize("method", list(METHODS))
def test_checkpoint_holds_the_adapter_only_and_resume_equals_uninterrupted(tmp_path, method):
    straight = _run(tmp_path / "a", method, max_steps=8)
    first = _run(tmp_path / "b", method, max_steps=4, every=4)  # one epoch: 4 batches
    (ckpt,) = list((tmp_path / "b" / "ckpt").glob("*.ckpt"))
    saved = torch.load(ckpt, weights_only=False)["state_dict"]
    assert set(saved) == {n for n, p in first.named_parameters() if p.requires_grad}
    assert all(k.startswith(f"model.{METHODS[method][1]}.") for k in saved)
    resumed = _run(tmp_path / "c", method, max_steps=8, ckpt_path=ckpt)
    assert first.losses == straight.losses[:4]
    assert resumed.losses == straight.losses[4:]  # bit-exact (the LSTM's dropout draws the same masks)
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_validate_from_an_adapter_only_checkpoint(tmp_path):
    trained = _run(tmp_path / "a", "prefix", max_steps=4, every=4)
    (ckpt,) = list((tmp_path / "a" / "ckpt").glob("*.ckpt"))
    trainer = make_trainer(tmp_path / "v", [METHODS["prefix"][0]()], limit_val_batches=1)
    (expected,) = trainer.validate(trained, verbose=False)
    trainer = make_trainer(tmp_path / "w", [METHODS["prefix"][0]()], limit_val_batches=1)
    (restored,) = trainer.validate(TinyLM("llama"), ckpt_path=ckpt, verbose=False)
    assert restored["val_loss"] == expected["val_loss"]
    trainer = make_trainer(tmp_path / "x", [PrefixTuning(num_virtual_tokens=5)], limit_val_batches=1)
    with pytest.raises(RuntimeError, match="settings differ from the checkpoint's"):
        trainer.validate(TinyLM("llama"), ckpt_path=ckpt, verbose=False)


def test_save_adapter_callback_writes_a_file_peft_reads(tmp_path):
    module = TinyLM("llama")
    save = SaveAdapter(str(tmp_path / "adapter"))
    make_trainer(tmp_path, [PTuning(num_virtual_tokens=4), save], max_steps=2).fit(module)
    base = TinyLM("llama").model
    theirs = peft.PeftModel.from_pretrained(base, save.saved_to).eval()
    ids = token_batch(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(
            theirs(input_ids=ids).logits, module.model.eval()(input_ids=ids).logits, atol=1e-5, rtol=1e-5
        )


def test_injects_after_configure_model(tmp_path):
    module = TinyLM("gpt2", build_in_configure_model=True)
    make_trainer(tmp_path, [PromptTuning(num_virtual_tokens=2)], max_steps=2).fit(module)
    assert [n for n, _ in find_adapters(module)] == ["model.prompt_tuning"]
    assert len(module.losses) == 2


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_fit_under_bf16_mixed_precision(tmp_path, method):
    module = TinyLM("llama")
    make_trainer(tmp_path, [METHODS[method][0]()], max_steps=2, precision="bf16-mixed").fit(module)
    ((_, adapter),) = find_adapters(module)
    assert all(p.dtype == torch.float32 for p in adapter.parameters())
    assert len(module.losses) == 2 and all(torch.isfinite(torch.tensor(module.losses)))


def test_bad_arguments_and_impossible_runs(tmp_path):
    with pytest.raises(ValueError, match="has no target modules"):
        PromptTuning(target_modules=["q_proj"])
    with pytest.raises(ValueError, match="sizes the MLP of prefix_projection=True"):
        PrefixTuning(encoder_hidden_size=8)
    with pytest.raises(TypeError, match="got unknown arguments \\['r'\\]"):
        PTuning(r=4)

    class Checkpointed(TinyLM):
        def configure_model(self):
            self.model.gradient_checkpointing_enable()
            self.model.train()  # checkpointing (and the refusal) applies in training mode only

    with pytest.raises(RuntimeError, match="gradient checkpointing is on"):
        make_trainer(tmp_path, [PrefixTuning(num_virtual_tokens=2)], max_steps=1).fit(Checkpointed("llama"))

"""Guard rails of the adapter callbacks: settings that used to be rounded or ignored, and checkpoints that do not fit
this run, now raise errors that say what differs."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader
from zenft_testing import TinyLM, make_trainer

from lightning_zenft import DoRA, LoRA, find_adapters


@pytest.mark.parametrize(
    ("kwargs", "bad"),
    [
        ({"r": 8.5}, "r=8.5"),
        ({"r": True}, "r=True"),
        ({"r": "big"}, "r='big'"),
        ({"alpha": True}, "alpha=True"),
        ({"dropout": "0.1"}, "dropout='0.1'"),
        ({"target_modules": 5}, "target_modules=5"),
        ({"target_modules": ["q_proj", 3]}, "target_modules=\\['q_proj', 3\\]"),
        ({"rank_pattern": {"o_proj": 2.5}}, "rank_pattern\\['o_proj'\\]=2.5"),
        ({"rank_pattern": {"(": 2}}, "not a valid regex"),
        ({"use_rslora": "yes"}, "use_rslora='yes'"),
    ],
)
def test_bad_settings_are_refused_not_rounded(kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        LoRA(**kwargs)


def test_unknown_and_fixed_arguments_are_refused():
    with pytest.raises(TypeError, match=r"unknown arguments \['rank'\]"):
        LoRA(rank=8)
    with pytest.raises(TypeError, match=r"DoRA sets \['use_dora'\] itself"):
        DoRA(use_dora=False)


def test_a_second_adapter_callback_on_other_layers_is_an_error_not_ignored(tmp_path):
    callbacks = [LoRA(r=8, target_modules="attention"), LoRA(r=8, target_modules="mlp")]
    with pytest.raises(RuntimeError, match=r"already holds adapters that differ.*planned layers have no adapter"):
        make_trainer(tmp_path, callbacks, max_steps=1).fit(TinyLM("llama"))


def test_optimizer_missing_one_adapter_tensor_is_an_error(tmp_path):
    class AllButOne(TinyLM):
        def configure_optimizers(self):
            params = [p for n, p in self.named_parameters() if p.requires_grad]
            return torch.optim.AdamW(params[1:], lr=0.1)

    with pytest.raises(RuntimeError, match=r"does not hold 1 of the 28 trained tensors.*q_proj\.lora_A"):
        make_trainer(tmp_path, [LoRA(r=2)], max_steps=1).fit(AllButOne("llama"))


def test_optimizer_missing_a_trained_bias_is_an_error(tmp_path):
    class AdaptersOnly(TinyLM):
        def configure_optimizers(self):
            return torch.optim.AdamW([p for n, p in self.named_parameters() if "lora_" in n], lr=0.1)

    with pytest.raises(RuntimeError, match=r"does not hold .* trained tensors.*bias"):
        make_trainer(tmp_path, [LoRA(r=2, target_modules=["c_attn"], bias="all")], max_steps=1).fit(
            AdaptersOnly("gpt2")
        )


# ---------------------------------------------------------------------------------------------------- resume
def _fit(tmp_path, callback, ckpt_path=None, steps=2):
    torch.manual_seed(0)
    module = TinyLM("llama")
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    trainer = make_trainer(tmp_path, [callback, checkpoint], max_steps=steps, enable_checkpointing=True)
    trainer.fit(module, ckpt_path=ckpt_path)
    return module, sorted((tmp_path / "ckpt").glob("*.ckpt"))


@pytest.fixture
def lora_checkpoint(tmp_path):
    _, (ckpt,) = _fit(tmp_path / "a", LoRA(r=4, alpha=8))
    return ckpt


@pytest.mark.parametrize(
    ("callback", "message"),
    [
        (LoRA(r=2, alpha=8), r"settings differ from the checkpoint's \(saved, now\): \{'r': \(4, 2\)\}"),
        (LoRA(r=4, alpha=16), r"settings differ .*'alpha': \(8.0, 16.0\)"),
        (LoRA(r=4, alpha=8, dropout=0.2), r"settings differ .*'dropout': \(0.0, 0.2\)"),
        (LoRA(r=4, alpha=8, target_modules="mlp"), r"settings differ .*'target_modules': \('all-linear', 'mlp'\)"),
        (DoRA(r=4, alpha=8), r"adapter callbacks \[\"LoRA.*\] differ from this Trainer's DoRA"),
    ],
)
def test_resume_with_other_settings_says_what_differs(tmp_path, lora_checkpoint, callback, message):
    with pytest.raises(RuntimeError, match=message):
        _fit(tmp_path / "b", callback, ckpt_path=lora_checkpoint, steps=4)


def test_validate_and_test_with_auto_rank_take_the_rank_from_the_checkpoint(tmp_path):
    torch.manual_seed(0)
    module = TinyLM("llama")
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    trained = make_trainer(tmp_path, [LoRA(r="auto"), checkpoint], max_steps=2, enable_checkpointing=True)
    trained.fit(module)
    (ckpt,) = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    rank = {layer.r for _, layer in find_adapters(module)}
    (r,) = rank
    (expected,) = make_trainer(tmp_path, [LoRA(r=r)], limit_val_batches=1).validate(module, verbose=False)

    fresh = TinyLM("llama")
    auto = LoRA(r="auto")
    (got,) = make_trainer(tmp_path, [auto], limit_val_batches=1).validate(fresh, ckpt_path=ckpt, verbose=False)
    assert {layer.r for _, layer in find_adapters(fresh)} == rank and auto.config.r in rank
    assert got["val_loss"] == expected["val_loss"]

    with pytest.raises(RuntimeError, match=r"r='auto' is resolved from the training set.*ckpt_path"):
        make_trainer(tmp_path, [LoRA(r="auto")], limit_val_batches=1).validate(TinyLM("llama"), verbose=False)


def test_resume_without_the_adapter_callback_says_to_add_it(tmp_path):
    from lightning_zenft import CausalLMModule

    config = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 64}  # fmt: skip
    ids = torch.randint(0, 64, (8, 6), generator=torch.Generator().manual_seed(0))
    batches = DataLoader(
        [{"input_ids": ids[i : i + 2], "attention_mask": torch.ones(2, 6), "labels": ids[i : i + 2]} for i in (0, 2)],
        batch_size=None,
    )
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    make_trainer(tmp_path, [LoRA(r=2), checkpoint], max_steps=2, enable_checkpointing=True).fit(
        CausalLMModule(model_config=config), train_dataloaders=batches
    )
    (ckpt,) = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    with pytest.raises(RuntimeError, match=r"holds adapters written by \[\"LoRA.*\"\], but this model has none"):
        make_trainer(tmp_path / "b", [], max_steps=4).fit(
            CausalLMModule(model_config=config), train_dataloaders=batches, ckpt_path=ckpt
        )

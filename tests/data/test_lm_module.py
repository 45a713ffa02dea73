"""CausalLMModule: building, loading, training steps and the optimizer."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lightning_zenft.data.datamodule import TextDataModule
from lightning_zenft.lm import CausalLMModule

TINY = {
    "model_type": "llama",
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}


def fixed_batch(vocab: int = 96, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (4, 16), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100  # a masked "prompt"
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def reference_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """Shifted next-token cross-entropy written out with plain PyTorch."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)), batch["labels"][:, 1:].reshape(-1), ignore_index=-100
    ).item()


def make_trainer(steps: int) -> L.Trainer:
    return L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def test_from_config_fit_lowers_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    module = CausalLMModule(model_config=TINY, learning_rate=1e-2)
    assert isinstance(module.model, LlamaForCausalLM) and module.model.config.hidden_size == 32
    assert module.model_name_or_path is None
    batch = fixed_batch()
    before = reference_loss(module.model, batch)
    assert abs(before - math.log(96)) < 0.5  # random init predicts ~uniformly
    trainer = make_trainer(steps=3)
    trainer.fit(module, train_dataloaders=DataLoader([batch] * 3, batch_size=None))
    after = reference_loss(module.model, batch)
    assert after < before - 0.05
    assert trainer.global_step == 3
    assert "train_loss" in trainer.callback_metrics
    assert module.hparams.model_config == TINY


def test_from_save_pretrained_dir_and_validation_loss(tmp_path):
    torch.manual_seed(1)
    ref = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in TINY.items() if k != "model_type"}))
    ref.save_pretrained(tmp_path)
    module = CausalLMModule(model=str(tmp_path))
    assert module.model_name_or_path == str(tmp_path)
    for (name, p), (_, q) in zip(module.model.state_dict().items(), ref.state_dict().items(), strict=True):
        assert torch.equal(p, q), name
    batch = fixed_batch(seed=2)
    trainer = make_trainer(steps=1)
    (metrics,) = trainer.validate(module, dataloaders=DataLoader([batch], batch_size=None), verbose=False)
    assert metrics["val_loss"] == pytest.approx(reference_loss(ref, batch), rel=1e-5)
    (metrics,) = trainer.test(module, dataloaders=DataLoader([batch], batch_size=None), verbose=False)
    assert metrics["test_loss"] == pytest.approx(reference_loss(ref, batch), rel=1e-5)


def test_from_pretrained_dtype(tmp_path):
    config = LlamaConfig(**{k: v for k, v in TINY.items() if k != "model_type"})
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    assert CausalLMModule(model=str(tmp_path), torch_dtype="bfloat16").model.dtype == torch.bfloat16
    assert CausalLMModule(model_config=TINY, torch_dtype="bfloat16").model.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="torch_dtype='int8' is not supported"):
        CausalLMModule(model_config=TINY, torch_dtype="int8")


def test_optimizer_holds_only_trainable_params_with_decay_groups():
    module = CausalLMModule(model_config=TINY, weight_decay=0.1)
    frozen = set()
    for name, p in module.named_parameters():
        if "layers.0." in name or "embed_tokens" in name:
            p.requires_grad_(False)
            frozen.add(id(p))
    opt = module.configure_optimizers()
    in_opt = {id(p): group["weight_decay"] for group in opt.param_groups for p in group["params"]}
    trainable = {id(p): p for p in module.parameters() if p.requires_grad}
    assert set(in_opt) == set(trainable)
    assert not frozen & set(in_opt)
    for pid, wd in in_opt.items():
        assert wd == (0.1 if trainable[pid].ndim >= 2 else 0.0)
    assert any(wd == 0.0 for wd in in_opt.values()) and any(wd == 0.1 for wd in in_opt.values())


def test_no_trainable_params_is_an_error():
    module = CausalLMModule(model_config=TINY)
    module.requires_grad_(False)
    with pytest.raises(RuntimeError, match="No parameter of the model requires grad"):
        module.configure_optimizers()


def test_linear_warmup_schedule():
    module = CausalLMModule(model_config=TINY, learning_rate=1e-3, warmup_steps=4)
    config = module.configure_optimizers()
    opt, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([1e-3 * min(1.0, (k + 1) / 4) for k in range(6)])


def test_argument_errors():
    with pytest.raises(ValueError, match="Got both model='x' and model_config"):
        CausalLMModule(model="x", model_config=TINY)
    with pytest.raises(ValueError, match="needs a 'model_type' entry"):
        CausalLMModule(model_config={"hidden_size": 8})
    with pytest.raises(ValueError, match="warmup_steps must be >= 0"):
        CausalLMModule(model_config=TINY, warmup_steps=-1)


def test_default_base_model_with_default_task_end_to_end():
    module = CausalLMModule(learning_rate=1e-3)
    data = TextDataModule(tokenizer=module.model_name_or_path, max_length=48, batch_size=8)
    trainer = L.Trainer(
        max_steps=2,
        limit_val_batches=2,
        val_check_interval=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=data)
    loader = iter(data.val_dataloader())
    expected = sum(reference_loss(module.model, next(loader)) for _ in range(2)) / 2
    assert trainer.callback_metrics["val_loss"].item() == pytest.approx(expected, rel=1e-4)


def test_gradient_checkpointing_gives_the_same_gradients_and_keeps_less():
    from lightning_zenft import LoRAConfig, find_adapters, inject_adapters
    from lightning_zenft.planning.measure import saved_activation_bytes

    results = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        module = CausalLMModule(model_config=TINY, gradient_checkpointing=checkpointing)
        inject_adapters(module.model, LoRAConfig(r=4, target_modules="all-linear"))  # frozen base and embedding
        with torch.no_grad():
            for _, layer in find_adapters(module.model):
                layer.low_rank_factors()[1].normal_()  # B = 0 would give A no gradient
        module.model.train()
        loss, saved = saved_activation_bytes(module.model, fixed_batch()["input_ids"])
        loss.backward()
        grads = {n: p.grad.clone() for n, p in module.model.named_parameters() if p.requires_grad}
        results[checkpointing] = (loss.item(), saved, grads)
    (loss0, saved0, grads0), (loss1, saved1, grads1) = results[False], results[True]
    assert loss0 == loss1 and grads0.keys() == grads1.keys()
    assert all(torch.allclose(grads0[n], grads1[n], rtol=1e-5, atol=1e-7) for n in grads0)
    assert saved1 < saved0 / 2  # each layer keeps its input only

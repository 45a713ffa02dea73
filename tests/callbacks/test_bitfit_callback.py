"""The BitFit callback inside a real Trainer: only biases train, share logged, checkpoints, resume, export, generate."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from zenft_testing import TinyLM, make_trainer, tiny_model, token_batch

from lightning_zenft import BitFit, SaveAdapter, count_parameters, load_adapter


def _biases(module: torch.nn.Module) -> set[str]:
    return {n for n, _ in module.named_parameters() if n.endswith(".bias")}


def test_fit_trains_only_biases_and_logs_the_share(tmp_path, caplog):
    module = TinyLM("gpt2")
    bitfit = BitFit()
    trainer = make_trainer(tmp_path, [bitfit], max_steps=2, logger=CSVLogger(tmp_path))
    with caplog.at_level(logging.INFO):
        trainer.fit(module)
    fresh = dict(TinyLM("gpt2").named_parameters())
    biases = _biases(module)
    for name, p in module.named_parameters():
        assert torch.equal(p, fresh[name]) != (name in biases), name  # every bias moved, nothing else did
    optimized = [p for group in trainer.optimizers[0].param_groups for p in group["params"]]
    assert {id(p) for p in optimized} == {id(p) for n, p in module.named_parameters() if n in biases}
    n_bias = sum(p.numel() for n, p in module.named_parameters() if n in biases)
    total = sum(p.numel() for p in module.parameters())
    assert (bitfit.trainable_params, bitfit.total_params) == count_parameters(module) == (n_bias, total)
    hparams = yaml.safe_load((tmp_path / "lightning_logs" / "version_0" / "hparams.yaml").read_text())
    assert (hparams["zenft/trainable_params"], hparams["zenft/total_params"]) == (n_bias, total)
    assert f"trainable params: {n_bias:,} || all params: {total:,} || trainable%: {100 * n_bias / total:.4f}" in (
        caplog.text
    )


def _run(tmp_path, max_steps, ckpt_path=None, every=None, arch="gpt2", **kwargs):
    torch.manual_seed(0)
    module = TinyLM(arch)
    callbacks = [BitFit(**kwargs)]
    if every:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=every, save_top_k=-1))
    trainer = make_trainer(tmp_path, callbacks, max_steps=max_steps, enable_checkpointing=bool(every))
    trainer.fit(module, ckpt_path=ckpt_path)
    return module


@pytest.mark.slow
def test_checkpoint_holds_what_trained_and_resume_equals_uninterrupted(tmp_path):
    kwargs = dict(blocks="last:1", block_parts="mlp")
    straight = _run(tmp_path / "a", max_steps=8, **kwargs)
    first = _run(tmp_path / "b", max_steps=4, every=4, **kwargs)
    (ckpt,) = list((tmp_path / "b" / "ckpt").glob("*.ckpt"))
    saved = torch.load(ckpt, weights_only=False)
    assert set(saved["state_dict"]) == {n for n, p in first.named_parameters() if p.requires_grad}
    assert set(saved["state_dict"]) == _biases(first) | {n for n, _ in first.named_parameters() if ".h.1.mlp." in n}
    resumed = _run(tmp_path / "c", max_steps=8, ckpt_path=ckpt, **kwargs)
    assert first.losses == straight.losses[:4]
    assert resumed.losses == straight.losses[4:]  # bit-exact
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(RuntimeError, match="settings differ from the checkpoint's"):
        _run(tmp_path / "d", max_steps=8, ckpt_path=ckpt, blocks="last:1")


def test_save_adapter_load_and_generate(tmp_path):
    module = TinyLM("gpt2", lr=0.2)
    trainer = make_trainer(tmp_path, [BitFit(train_head=False), SaveAdapter("bitfit")], max_steps=3)
    trainer.fit(module)
    config = json.loads((tmp_path / "bitfit" / "adapter_config.json").read_text())
    assert config["method"] == "bitfit" and config["trained_parameters"] == sorted(_biases(module.model))
    fresh = tiny_model("gpt2")
    load_adapter(fresh, tmp_path / "bitfit")
    model = module.model.eval()
    ids = token_batch(2, 5, seed=7)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, atol=0, rtol=0)
        tokens = model.generate(ids, **kwargs)
        assert torch.equal(tokens, fresh.generate(ids, **kwargs))
        assert not torch.equal(tokens, tiny_model("gpt2").generate(ids, **kwargs))


def test_validate_after_fit_and_from_an_adapter_only_checkpoint(tmp_path):
    trained = _run(tmp_path / "a", max_steps=3, every=3)
    (ckpt,) = list((tmp_path / "a" / "ckpt").glob("*.ckpt"))
    (expected,) = make_trainer(tmp_path / "v", [BitFit()], limit_val_batches=1).validate(trained, verbose=False)
    assert {n for n, p in trained.named_parameters() if p.requires_grad} == _biases(trained)
    trainer = make_trainer(tmp_path / "w", [BitFit()], limit_val_batches=1)
    (restored,) = trainer.validate(TinyLM("gpt2"), ckpt_path=ckpt, verbose=False)
    assert restored["val_loss"] == expected["val_loss"]


def test_llama_without_biases(tmp_path):
    with pytest.raises(ValueError, match="has no bias parameters"):
        make_trainer(tmp_path, [BitFit()], max_steps=1).fit(TinyLM("llama"))
    module = TinyLM("llama")
    make_trainer(tmp_path, [BitFit(bias="none", blocks=[-1], block_parts="attention")], max_steps=1).fit(module)
    assert {n for n, p in module.named_parameters() if p.requires_grad} == {
        n for n, _ in module.named_parameters() if ".layers.1.self_attn." in n
    }


def test_bitfit_and_ia3_from_yaml():
    from jsonargparse import ArgumentParser
    from lightning.pytorch.callbacks import Callback

    parser = ArgumentParser()
    parser.add_argument("--callbacks", type=list[Callback])
    text = """
    - class_path: lightning_zenft.BitFit
      init_args: {bias: none, blocks: [0, -1], block_parts: mlp}
    - class_path: lightning_zenft.BitFit
      init_args: {blocks: "last:2", train_head: true}
    - class_path: lightning_zenft.IA3
      init_args: {target_modules: [k_proj, v_proj, down_proj], feedforward_modules: [down_proj]}
    """
    callbacks = parser.instantiate(parser.parse_args([f"--callbacks={text}"])).callbacks
    assert [c.config.blocks for c in callbacks[:2]] == [[0, -1], "last:2"]
    assert callbacks[0].config.block_parts == "mlp" and callbacks[1].config.train_head is True
    assert callbacks[2].config.feedforward_modules == ["down_proj"]

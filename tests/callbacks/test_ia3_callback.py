"""The IA3 callback inside a real Trainer: what trains, adapter-only checkpoints, resume, generate, kernels, export."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from zenft_testing import TinyLM, make_trainer, tiny_model, token_batch

from lightning_zenft import (
    IA3,
    FusedKernels,
    IA3Linear,
    LoRA,
    SaveAdapter,
    count_parameters,
    find_adapters,
    load_adapter,
    merge_adapters,
)


def test_fit_trains_only_the_vectors(tmp_path):
    module = TinyLM("llama")
    ia3 = IA3()
    trainer = make_trainer(tmp_path, [ia3], max_steps=3)
    trainer.fit(module)
    layers = dict(find_adapters(module))
    assert ia3.targets == list(layers) and len(layers) == 6
    assert all(isinstance(layer, IA3Linear) for layer in layers.values())
    assert [n.rsplit(".", 1)[-1] for n, layer in layers.items() if layer.feedforward] == ["down_proj", "down_proj"]
    fresh = dict(TinyLM("llama").named_parameters())
    for name, p in module.named_parameters():
        if not p.requires_grad:  # the frozen base is untouched
            assert torch.equal(p, fresh[name.replace(".base_layer", "")]), name
    assert all(not torch.equal(layer.ia3_l, torch.ones_like(layer.ia3_l)) for layer in layers.values())
    optimized = [p for group in trainer.optimizers[0].param_groups for p in group["params"]]
    assert {id(p) for p in optimized} == {id(layer.ia3_l) for layer in layers.values()}
    assert (ia3.trainable_params, ia3.total_params) == count_parameters(module)


def _run(tmp_path, max_steps, ckpt_path=None, every=None, **kwargs):
    torch.manual_seed(0)
    module = TinyLM("gpt2")
    callbacks = [IA3(**kwargs)]
    if every:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=every, save_top_k=-1))
    trainer = make_trainer(tmp_path, callbacks, max_steps=max_steps, enable_checkpointing=bool(every))
    trainer.fit(module, ckpt_path=ckpt_path)
    return module


@pytest.mark.slow
def test_checkpoint_holds_the_vectors_only_and_resume_equals_uninterrupted(tmp_path):
    straight = _run(tmp_path / "a", max_steps=8)
    first = _run(tmp_path / "b", max_steps=4, every=4)
    (ckpt,) = list((tmp_path / "b" / "ckpt").glob("*.ckpt"))
    saved = torch.load(ckpt, weights_only=False)
    assert set(saved["state_dict"]) == {f"{n}.ia3_l" for n, _ in find_adapters(first)}
    resumed = _run(tmp_path / "c", max_steps=8, ckpt_path=ckpt)
    assert first.losses == straight.losses[:4]
    assert resumed.losses == straight.losses[4:]  # bit-exact
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(RuntimeError, match="feedforward_modules"):  # other settings: refused before tensors load
        _run(tmp_path / "d", max_steps=8, ckpt_path=ckpt, feedforward_modules=[])


def test_generate_with_the_adapter_equals_the_merged_model(tmp_path):
    module = TinyLM("llama", lr=0.2)
    make_trainer(tmp_path, [IA3()], max_steps=3).fit(module)
    model = module.model.eval()
    ids = token_batch(2, 5, seed=7)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        tokens = model.generate(ids, **kwargs)
        merged = copy.deepcopy(model)
        assert merge_adapters(merged) == 6
        expected = merged.generate(ids, **kwargs)
        base = tiny_model("llama").generate(ids, **kwargs)
    assert torch.equal(tokens, expected)
    assert not torch.equal(tokens, base)  # the trained vectors change what is generated


def test_fused_kernels_fall_back_naming_each_layer(tmp_path):
    torch.manual_seed(0)
    plain = TinyLM("llama")
    make_trainer(tmp_path / "a", [IA3()], max_steps=2).fit(plain)
    torch.manual_seed(0)
    fused = TinyLM("llama")
    kernels = FusedKernels(rms_norm=False, rope=False, fused_linear_cross_entropy=False)
    with pytest.warns(UserWarning) as record:
        make_trainer(tmp_path / "b", [IA3(), kernels], max_steps=2).fit(fused)
    messages = [str(w.message) for w in record]
    for name, _ in find_adapters(fused):
        line = f"fused LoRA: {name} keeps the unfused LoRA forward: IA3Linear has no fused kernel"
        assert any(m.startswith(line) for m in messages), name
    assert fused.losses == plain.losses


def test_save_adapter_writes_peft_ia3_and_loads_back(tmp_path):
    module = TinyLM("gpt2")
    trainer = make_trainer(tmp_path, [IA3(), SaveAdapter("ia3")], max_steps=2)
    trainer.fit(module)
    config = json.loads((tmp_path / "ia3" / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and len(config["target_modules"]) == 4
    fresh = tiny_model("gpt2")
    load_adapter(fresh, tmp_path / "ia3")
    ids = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, module.model.eval()(ids).logits, atol=1e-6, rtol=1e-6)


def test_adoption_and_a_different_callback(tmp_path):
    module = TinyLM("llama")
    make_trainer(tmp_path, [IA3()], max_steps=1).fit(module)
    make_trainer(tmp_path, [IA3()], limit_val_batches=1).validate(module, verbose=False)  # a second Trainer adopts
    assert len(list(find_adapters(module))) == 6
    with pytest.raises(RuntimeError, match="holds a ia3 adapter, not lora"):
        make_trainer(tmp_path, [LoRA(r=2, target_modules=["k_proj", "v_proj", "down_proj"])], limit_val_batches=1
                     ).validate(module, verbose=False)  # fmt: skip
    with pytest.raises(ValueError, match="bias='all': IA3 trains no biases"):
        IA3(bias="all")

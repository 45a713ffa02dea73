"""NF4Precision in a Trainer: quantized layers per mode, LoRA/DoRA on a 4-bit base against the dequantized reference,
adapter-only checkpoints that resume bit-exactly, resume mismatches, YAML, and the fused kernels on 4-bit layers."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from zenft_testing import TinyLM, make_trainer, tiny_model, token_batch

bnb = pytest.importorskip("bitsandbytes", reason="the 4-bit layers are bitsandbytes'")

from lightning_zenft import (  # noqa: E402
    CausalLMModule,
    DoRALinear,
    FusedKernels,
    LoRA,
    LoRAConfig,
    LoRALinear,
    NF4Precision,
    find_adapters,
    inject_adapters,
)
from lightning_zenft.precision import QuantSpec, dequantize, quantize_weight, to_linear4bit  # noqa: E402
from lightning_zenft.precision.quantize import MODES  # noqa: E402


class _ShortLM(TinyLM):
    """TinyLM with two batches per epoch, so a checkpoint after two steps falls on an epoch boundary."""

    def train_dataloader(self):
        return DataLoader(TensorDataset(token_batch(8, 12, seed=3)), batch_size=4, shuffle=False)


def _fit(tmp_path, steps=2, mode="nf4", seed=0, ckpt_path=None, every=None, plugin=True, module=None, **lora):
    torch.manual_seed(0)
    module = module or _ShortLM("llama", seed=seed)
    callbacks = [LoRA(r=4, alpha=8, **{"dropout": 0.1, **lora})]
    if every:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=every, save_top_k=-1))
    plugins = [NF4Precision(mode, compute_dtype=torch.float32)] if plugin else []
    trainer = make_trainer(tmp_path, callbacks, max_steps=steps, enable_checkpointing=bool(every), plugins=plugins)
    trainer.fit(module, ckpt_path=ckpt_path)
    return module, trainer


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_quantizes_the_frozen_base_and_training_leaves_it_untouched(tmp_path, mode):
    original = {n: m.weight.detach().clone() for n, m in tiny_model("llama").named_modules() if type(m) is nn.Linear}
    module = TinyLM("llama")
    inject_adapters(module.model, LoRAConfig(r=4, alpha=8))
    plugin = NF4Precision(mode, compute_dtype=torch.float32)
    plugin.convert_module(module)
    layers = dict(find_adapters(module.model))
    assert len(layers) == 14 and plugin.quantized == [f"model.{name}.base_layer" for name in layers]
    spec = QuantSpec.from_mode(mode, compute_dtype=torch.float32)
    for name, layer in layers.items():
        assert isinstance(layer.base_layer, bnb.nn.Linear4bit)
        want = quantize_weight(original[name], spec)  # what quantizing the original weight gives
        assert torch.equal(layer.base_layer.weight.data, want.data)
        assert torch.equal(dequantize(layer.base_layer.weight), dequantize(want))
        assert layer.lora_A.weight.dtype == torch.float32
    assert type(module.model.lm_head) is nn.Linear
    if mode != "nf4-dq":
        return
    before = {n: layer.base_layer.weight.data.clone() for n, layer in layers.items()}
    module, trainer = _fit(tmp_path, mode=mode)  # in a Trainer: the plugin converts at setup, training moves adapters
    for name, layer in find_adapters(module.model):
        assert torch.equal(layer.base_layer.weight.data, before[name]), name
        assert layer.lora_B.weight.abs().sum() > 0
    assert all(torch.isfinite(torch.tensor(module.losses)))


@pytest.mark.parametrize("layer_cls", [LoRALinear, DoRALinear])
@pytest.mark.parametrize("mode", ["nf4", "fp4-dq"])
def test_adapter_on_a_4bit_base_equals_the_dequantized_reference(layer_cls, mode):
    torch.manual_seed(0)
    linear = nn.Linear(128, 48)
    layer = layer_cls(linear, r=4, alpha=8)
    layer.base_layer = to_linear4bit(linear, QuantSpec.from_mode(mode, compute_dtype=torch.float32))
    dense = nn.Linear(128, 48)
    with torch.no_grad():
        dense.weight.copy_(dequantize(layer.base_layer.weight))
        dense.bias.copy_(linear.bias)
        nn.init.normal_(layer.lora_B.weight)  # a trained adapter
    reference = layer_cls(dense, r=4, alpha=8)
    with torch.no_grad():
        for name in layer.adapter_params():  # the same A, B (and magnitude)
            reference.get_parameter(name).copy_(layer.get_parameter(name))
    x = torch.randn(2, 6, 128, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = layer(x), reference(x_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    for name in layer.adapter_params():
        got, want = layer.get_parameter(name).grad, reference.get_parameter(name).grad
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)


def test_checkpoint_holds_adapters_and_4bit_settings_and_resumes_bit_exactly(tmp_path):
    straight, _ = _fit(tmp_path / "a", steps=4, mode="nf4-dq", init="loftq")
    first, _ = _fit(tmp_path / "b", steps=2, every=2, mode="nf4-dq", init="loftq")
    (ckpt,) = (tmp_path / "b" / "ckpt").glob("*.ckpt")
    saved = torch.load(ckpt, weights_only=False)
    assert set(saved["state_dict"]) == {n for n, p in first.named_parameters() if p.requires_grad}
    settings = {"mode": "nf4-dq", "blocksize": 64, "compute_dtype": "torch.float32"}
    assert saved["NF4Precision"]["quantization"] == settings
    assert len(saved["NF4Precision"]["checksums"]) == 14
    resumed, _ = _fit(tmp_path / "c", steps=4, mode="nf4-dq", ckpt_path=ckpt, init="loftq")
    assert first.losses == straight.losses[:2] and resumed.losses == straight.losses[2:]
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters(), strict=True):
        if a.requires_grad:
            assert torch.equal(a, b), name


def test_resuming_onto_another_base_is_an_error(tmp_path):
    _fit(tmp_path / "a", steps=2, every=2)
    (ckpt,) = (tmp_path / "a" / "ckpt").glob("*.ckpt")
    with pytest.raises(RuntimeError, match="quantized as .*'nf4'.* this run as .*'fp4'"):
        _fit(tmp_path / "b", steps=4, ckpt_path=ckpt, mode="fp4")
    with pytest.raises(RuntimeError, match="4-bit base differs .* 14 of 14 4-bit weights differ"):
        _fit(tmp_path / "c", steps=4, ckpt_path=ckpt, seed=1)  # another base model
    _fit(tmp_path / "d", steps=2, every=2, plugin=False)
    (dense_ckpt,) = (tmp_path / "d" / "ckpt").glob("*.ckpt")
    with pytest.raises(RuntimeError, match="written by a run without NF4Precision"):
        _fit(tmp_path / "e", steps=4, ckpt_path=dense_ckpt)


class _LMData(DataLoader):
    def __init__(self) -> None:
        ids = token_batch(8, 12, seed=3)
        super().__init__([{"input_ids": row, "labels": row} for row in ids], batch_size=4)


def test_a_4bit_checkpoint_into_a_run_without_the_plugin_is_an_error(tmp_path):
    config = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128}  # fmt: skip
    callbacks = [LoRA(r=2), ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)]
    trainer = make_trainer(tmp_path, callbacks, max_steps=2, enable_checkpointing=True,
                           plugins=[NF4Precision(compute_dtype=torch.float32)])  # fmt: skip
    trainer.fit(CausalLMModule(model_config=config), train_dataloaders=_LMData())
    (ckpt,) = (tmp_path / "ckpt").glob("*.ckpt")
    trainer = make_trainer(tmp_path / "b", [LoRA(r=2)], max_steps=4)
    with pytest.raises(RuntimeError, match=r"trained on a 4-bit base .* plugins=\[NF4Precision\(mode='nf4'"):
        trainer.fit(CausalLMModule(model_config=config), train_dataloaders=_LMData(), ckpt_path=ckpt)


def test_yaml_plugin_without_init_args(tmp_path):
    from lightning_zenft.cli import cli_main

    config = {
        "trainer": {"accelerator": "cpu", "max_steps": 2, "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False, "default_root_dir": str(tmp_path),
                    "plugins": [{"class_path": "lightning_zenft.NF4Precision"}],
                    "callbacks": [{"class_path": "lightning_zenft.LoRA", "init_args": {"r": 4}}]},
        "data": {"max_length": 32, "batch_size": 2, "train_file": str(tmp_path / "train.jsonl")},
    }  # fmt: skip
    records = [{"prompt": f"Join with hyphens: a b {i}\nAnswer:", "completion": f" a-b-{i}"} for i in range(8)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = cli_main(["fit", "--config", str(path)])
    plugin = cli.trainer.precision_plugin
    assert isinstance(plugin, NF4Precision) and (plugin.mode, plugin.compute_dtype) == ("nf4", torch.bfloat16)
    layers = dict(find_adapters(cli.model.model))
    assert layers and all(isinstance(layer.base_layer, bnb.nn.Linear4bit) for layer in layers.values())
    assert cli.trainer.global_step == 2


def test_fused_kernels_read_4bit_layers(tmp_path):
    """NF4 bases run the kernels' NF4 path, FP4 bases their dequantizer path: the unfused layers' results."""
    plain, _ = _fit(tmp_path / "a", steps=2, dropout=0.0)
    fused_kernels = FusedKernels(mlp=False, shared_input=False)
    torch.manual_seed(0)
    module = _ShortLM("llama")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path / "b", [LoRA(r=4, alpha=8), fused_kernels], max_steps=2,
                     plugins=[NF4Precision(compute_dtype=torch.float32)]).fit(module)  # fmt: skip
    assert len(fused_kernels.applied["lora"]) == 14
    assert not any("keeps the unfused LoRA forward" in str(w.message) for w in caught)
    torch.testing.assert_close(torch.tensor(module.losses), torch.tensor(plain.losses), rtol=1e-5, atol=1e-5)

    from lightning_zenft.fusion import fuse_lora_layers, unfuse_lora_layers

    model = tiny_model("llama")
    inject_adapters(model, LoRAConfig(r=4, alpha=8))
    NF4Precision("fp4", compute_dtype=torch.float32).convert_module(model)
    for _, layer in find_adapters(model):
        nn.init.normal_(layer.lora_B.weight, std=0.1)
    ids = token_batch(2, 12)
    want = model(input_ids=ids, labels=ids).loss
    want.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    assert len(fuse_lora_layers(model, mlp=False, shared_input=False).layers) == 14
    got = model(input_ids=ids, labels=ids).loss
    got.backward()
    unfuse_lora_layers(model)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, grads[name], rtol=1e-4, atol=1e-6, msg=name)

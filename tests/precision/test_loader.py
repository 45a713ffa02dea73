"""The low-memory loader: the same model as loading then quantizing, its errors, CausalLMModule's path, and its peak
host memory measured in a fresh process against the 4-bit model's size."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from zenft_testing import make_trainer, token_batch

pytest.importorskip("bitsandbytes", reason="the 4-bit layers are bitsandbytes'")

from lightning_zenft import CausalLMModule, LoRA, NF4Precision, find_adapters  # noqa: E402
from lightning_zenft.precision import QuantSpec, load_pretrained_4bit, loftq_decompose, plan_quantization  # noqa: E402
from lightning_zenft.precision.quantize import to_linear4bit  # noqa: E402
from lightning_zenft.precision.select import is_4bit_layer  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CONFIG = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128}  # fmt: skip


def _save(path: Path, tie: bool = False, shard: str = "40KB") -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(CONFIG)
    config = AutoConfig.for_model(cfg.pop("model_type"), tie_word_embeddings=tie, **cfg)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path, max_shard_size=shard)
    return path


@pytest.mark.parametrize("tie", [False, True])
def test_loading_tensor_by_tensor_equals_loading_then_quantizing(tmp_path, tie):
    from transformers import AutoModelForCausalLM

    path = _save(tmp_path / "base", tie=tie)
    assert len(list(path.glob("*.safetensors"))) > 1  # sharded
    spec = QuantSpec.from_mode("nf4-dq", compute_dtype=torch.float32)
    loaded = load_pretrained_4bit(path, spec)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    reference.requires_grad_(False)
    for name in plan_quantization(reference).targets:
        parent, _, child = name.rpartition(".")
        setattr(reference.get_submodule(parent), child, to_linear4bit(reference.get_submodule(name), spec))
    assert {n for n, m in loaded.named_modules() if is_4bit_layer(m)} == set(plan_quantization(reference).quantized)
    for (name, a), (_, b) in zip(loaded.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(a, b), name  # codes, scales, embeddings, norms, rotary buffers
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tie
    ids = token_batch(2, 10)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, reference(ids).logits)


def test_causal_lm_module_loads_4bit_inside_the_plugin_context_and_loftq_rereads_the_weights(tmp_path):
    path = _save(tmp_path / "base")
    plugin = NF4Precision(compute_dtype=torch.float32)
    with plugin.module_init_context():
        module = CausalLMModule(model=str(path))
    assert sum(is_4bit_layer(m) for m in module.model.modules()) == 14
    assert module.model.training and module.model_name_or_path == str(path)
    original = CausalLMModule(model=str(path))  # outside the context: full precision
    assert not any(is_4bit_layer(m) for m in original.model.modules())
    ids = token_batch(4, 12)
    data = [{"input_ids": row, "labels": row} for row in ids]
    torch.manual_seed(0)
    lora = LoRA(r=4, alpha=8, target_modules=["q_proj", "down_proj"], init="loftq", loftq_iters=2)
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    make_trainer(tmp_path, [lora], max_steps=1, plugins=[plugin]).fit(module, train_dataloaders=loader)
    for name, layer in find_adapters(module.model):
        weight = original.model.get_submodule(name).weight  # the file's weight, which LoftQ read back
        q, _, _ = loftq_decompose(weight, 4, 2.0, plugin.spec, iters=2)
        assert torch.equal(layer.base_layer.weight.data, q.data), name
        assert torch.equal(layer.base_layer.weight.quant_state.absmax, q.quant_state.absmax), name


def test_loader_errors_name_the_file_and_the_way_out(tmp_path):
    spec = QuantSpec()
    with pytest.raises(FileNotFoundError, match="holds no model.safetensors"):
        load_pretrained_4bit(tmp_path, spec)
    path = _save(tmp_path / "base", shard="10GB")
    weights = path / "model.safetensors"
    size = struct.unpack("<Q", weights.read_bytes()[:8])[0]
    header = json.loads(weights.read_bytes()[8 : 8 + size])
    from safetensors.torch import load_file, save_file

    tensors = load_file(weights)
    save_file({**tensors, "model.extra.weight": torch.zeros(2)}, weights, metadata=header.get("__metadata__"))
    with pytest.raises(ValueError, match=r"1 tensors match no parameter .*'model.extra.weight'"):
        load_pretrained_4bit(path, spec)
    tensors.pop("model.norm.weight")
    save_file(tensors, weights, metadata=header.get("__metadata__"))
    with pytest.raises(ValueError, match=r"lacks 1 tensors .*model.norm.weight"):
        load_pretrained_4bit(path, spec)


@pytest.mark.slow
def test_peak_host_memory_of_the_low_memory_load(tmp_path):
    """A 0.1B-parameter Llama in bf16 shards: the load adds at most 1.5x the 4-bit model to peak RSS; bf16 first does
    not."""
    out = tmp_path / "mem.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "qlora_host_memory.py"), "--size", "small", "--modes",
           "ours,dense", "--dir", str(tmp_path / "model"), "--json", str(out)]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT, timeout=600)
    result = json.loads(out.read_text())
    ours, dense = result["results"]
    assert ours["mode"] == "ours" and ours["layers_4bit"] == 56 == dense["layers_4bit"]
    assert ours["model_bytes"] == dense["model_bytes"]  # the same 4-bit model either way
    assert ours["peak_bytes"] <= 1.5 * ours["model_bytes"]
    assert dense["peak_bytes"] > result["shard_bytes"]  # the bf16 copy existed: the measurement can tell


def test_fabric_init_module_loads_4bit_and_setup_trains_the_adapters(tmp_path):
    import lightning as L

    from lightning_zenft import LoRAConfig, inject_adapters
    from lightning_zenft.precision import FabricNF4Precision

    path = _save(tmp_path / "base")
    fabric = L.Fabric(accelerator="cpu", devices=1, plugins=[FabricNF4Precision(compute_dtype=torch.float32)])
    with fabric.init_module():
        model = CausalLMModule(model=str(path)).model
    assert sum(is_4bit_layer(m) for m in model.modules()) == 14
    inject_adapters(model, LoRAConfig(r=2))
    codes = {n: m.weight.data.clone() for n, m in model.named_modules() if is_4bit_layer(m)}
    model = fabric.setup(model)
    optimizer = fabric.setup_optimizers(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1))
    ids = token_batch(2, 8)
    fabric.backward(model(input_ids=ids, labels=ids).loss)
    optimizer.step()
    assert all(layer.lora_B.weight.abs().sum() > 0 for _, layer in find_adapters(model))
    assert all(torch.equal(m.weight.data, codes[n]) for n, m in model.module.named_modules() if is_4bit_layer(m))


def test_zenft_fit_with_the_plugin_builds_the_model_in_4bit(tmp_path, monkeypatch):
    """`zenft fit --config` with NF4Precision in trainer.plugins loads through the low-memory loader (never a
    full-precision model), with the YAML's settings; the Trainer's own plugin then finds the layers 4-bit already."""
    import yaml

    from lightning_zenft.cli import cli_main
    from lightning_zenft.data.paths import DEFAULT_BASE_MODEL_DIR
    from lightning_zenft.precision import fabric

    loads: list[str] = []
    real = fabric.load_pretrained_4bit

    def recording(directory, *args, **kwargs):  # the real loader, its calls recorded
        loads.append(str(directory))
        return real(directory, *args, **kwargs)

    monkeypatch.setattr(fabric, "load_pretrained_4bit", recording)
    nf4 = {"class_path": "lightning_zenft.NF4Precision", "init_args": {"mode": "nf4-dq", "compute_dtype": "float32"}}
    config = {
        "trainer": {"accelerator": "cpu", "max_steps": 2, "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False, "default_root_dir": str(tmp_path), "plugins": [nf4],
                    "callbacks": [{"class_path": "lightning_zenft.LoRA", "init_args": {"r": 4}}]},
        "data": {"max_length": 32, "batch_size": 2},
    }  # fmt: skip
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = cli_main(["fit", "--config", str(path)])
    assert loads == [str(DEFAULT_BASE_MODEL_DIR)]  # model: null is the embedded model, read once, in 4 bits
    assert cli.trainer.precision_plugin.spec == QuantSpec.from_mode("nf4-dq", compute_dtype=torch.float32)
    bases = [layer.base_layer for _, layer in find_adapters(cli.model.model)]
    assert bases and all(is_4bit_layer(b) and b.weight.quant_state.nested for b in bases)
    assert cli.trainer.global_step == 2
    # without the plugin, nothing goes through the 4-bit loader
    del config["trainer"]["plugins"]
    path.write_text(yaml.safe_dump(config))
    cli_main(["fit", "--config", str(path)])
    assert len(loads) == 1

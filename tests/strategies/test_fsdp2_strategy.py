"""FSDP2Strategy on 2 CPU processes (gloo) against one process, against itself resumed, and against arithmetic.

One launch of ``fsdp_run.py`` runs every 2-process scenario (imports and process start-up dominate); the tests below
read its results. The one-process references run in this process, with no strategy.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file
from zenft_testing import child_env, tiny_model, token_batch

from lightning_zenft import LoRAConfig, estimate_memory, inject_adapters

SCRIPT = Path(__file__).with_name("fsdp_run.py")
pytestmark = pytest.mark.slow


def _script():
    spec = importlib.util.spec_from_file_location("fsdp_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The one-process references (here) and the 2-process results (one launch)."""
    root = tmp_path_factory.mktemp("fsdp")
    script = _script()
    threads = torch.get_num_threads()
    try:
        reference = script.scenario_reference(1, root / "one")
        saver = ModelCheckpoint(dirpath=root / "one-ckpt", every_n_train_steps=2, save_top_k=-1)
        script.fit(1, root / "one", 2, [script.lora(), saver])
        plain, _ = script.fit(1, root / "one-plain", 3, [script.lora()])
    finally:
        torch.set_num_threads(threads)
    (single_ckpt,) = sorted((root / "one-ckpt").glob("*.ckpt"))
    env = child_env(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "2", str(root), str(single_ckpt)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    two = torch.load(root / "results.pt", weights_only=False)
    return {"root": root, "one": reference, "one_lora": script.global_losses(plain), **two}


def test_full_finetune_equals_one_process(run):
    one, two = run["one"], run["reference"]
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert one["losses"][-1] < one["losses"][0]  # it trains
    assert two["params"].keys() == one["params"].keys()
    for name, value in one["params"].items():  # gathered from the two ranks' shards
        torch.testing.assert_close(two["params"][name], value, rtol=1e-5, atol=1e-6)


def test_lora_equals_one_process(run):
    assert run["fused"]["plain"] == pytest.approx(run["one_lora"], rel=1e-5)


@pytest.mark.parametrize("kind", ["sharded", "full"])
def test_adapter_only_checkpoint_resumes_to_the_uninterrupted_losses(run, kind):
    straight, result = run["lora"]["straight"], run["lora"][kind]
    assert result["first"] == straight[:2]
    assert result["resumed"] == straight[2:]  # bit-exact, adapter dropout included


def _trained_names() -> set[str]:
    model = tiny_model("llama")
    inject_adapters(model, LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    return {f"model.{n}" for n, p in model.named_parameters() if p.requires_grad}


def _payload(path: Path) -> tuple[dict[str, tuple[int, ...]], int]:
    """Model tensors in a sharded checkpoint and the bytes of every tensor it stores (model and optimizer)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(path).read_metadata().state_dict_metadata
    tensors = {k: md for k, md in metadata.items() if isinstance(md, TensorStorageMetadata)}
    model = {k[len("state_dict.") :]: tuple(md.size) for k, md in tensors.items() if k.startswith("state_dict.")}
    total = sum(math.prod(md.size) * md.properties.dtype.itemsize for md in tensors.values())
    return model, total


def _disk(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def test_checkpoints_hold_the_trained_tensors_only(run):
    trained = _trained_names()
    sharded = Path(run["lora"]["sharded"]["path"])
    assert sharded.is_dir() and (sharded / "meta.pt").is_file()
    model, payload = _payload(sharded)
    assert set(model) == trained  # the base is never written
    n_trained = sum(math.prod(s) for s in model.values())
    assert n_trained == 4096
    # fp32 adapters + AdamW's two fp32 states per element + one fp32 step count per tensor
    assert payload == 4 * n_trained * 3 + 4 * len(model)
    full = torch.load(run["lora"]["full"]["path"], weights_only=False)
    assert set(full["state_dict"]) == trained
    assert set(full["optimizer_states"][0]["state"]) == trained  # keyed by name
    with_base, with_base_payload = _payload(Path(run["lora"]["with_base_path"]))
    base = {k: s for k, s in with_base.items() if k not in trained}
    assert set(with_base) - trained == set(base) and base
    assert with_base_payload == payload + 4 * sum(math.prod(s) for s in base.values())
    both = _disk(Path(run["lora"]["with_base_path"]))
    print(f"\nsharded checkpoint: adapters only {_disk(sharded):,} B on disk ({payload:,} B of tensors), with the base "
          f"{both:,} B ({with_base_payload:,} B)")  # fmt: skip


def test_a_one_process_checkpoint_resumes_under_fsdp2(run):
    # two steps in one process (rounding differs from the sharded run's), the third under FSDP2 (no dropout)
    assert run["lora"]["from_single"] == pytest.approx(run["fused"]["plain"][2:], rel=1e-5)


def test_save_adapter_gathers_whole_tensors_on_rank0_and_loads_in_peft(run):
    from peft import PeftModel

    adapter = run["root"] / "adapter"
    gathered = run["lora"]["adapter_params"]
    saved = load_file(adapter / "adapter_model.safetensors")
    assert len(saved) == len(gathered) == 28
    for name, value in gathered.items():
        key = "base_model.model." + name.removeprefix("model.")
        assert torch.equal(saved[key], value), name
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8
    ours = tiny_model("llama")
    inject_adapters(ours, LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad:
                p.copy_(gathered["model." + name])
    peft = PeftModel.from_pretrained(tiny_model("llama"), adapter).eval()
    ids = token_batch(2, 10, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(peft(ids).logits, ours.eval()(ids).logits, rtol=1e-5, atol=1e-5)


def test_fused_kernels_run_on_sharded_layers(run):
    fused = run["fused"]
    assert fused["warnings"] == []  # no layer fell back
    assert len(fused["applied"]["lora"]) == 14 and len(fused["applied"]["mlp"]) == 2
    assert len(fused["applied"]["shared_input"]) == 2  # q/k/v of each block, observed in the first sharded forward
    assert fused["fused"] == pytest.approx(fused["plain"], rel=1e-6)
    for name, value in fused["plain_params"].items():
        torch.testing.assert_close(fused["fused_params"][name], value, rtol=1e-5, atol=1e-6)


def test_activation_checkpointing_recomputes_blocks_with_the_same_results(run):
    fused = run["fused"]
    assert fused["checkpointed"] == fused["plain"]
    for name, value in fused["plain_params"].items():
        assert torch.equal(fused["checkpointed_params"][name], value), name
    saved = fused["saved_bytes"]
    assert saved["checkpointed"] < 0.25 * saved["plain"], saved
    assert fused["units"] == ["model.model.layers.0", "model.model.layers.1", "model"]


def test_bf16_frozen_weights_stored_in_bf16_give_the_same_losses(run):
    bf16 = run["bf16"]
    assert bf16["cast"] == bf16["kept"]
    for name, dtype in bf16["dtypes"].items():
        assert dtype == ("torch.float32" if ".lora_" in name else "torch.bfloat16"), name
    assert bf16["cast"] == pytest.approx(run["fused"]["plain"][:2], rel=1e-3)  # bf16 compute vs fp32


def test_per_rank_memory_equals_the_estimate(run, tmp_path):
    directory = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(directory)
    adapted = tiny_model("llama")
    inject_adapters(adapted, LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    block = adapted.model.layers[0]
    adapters = sum(p.numel() for p in block.parameters() if p.requires_grad)
    base = sum(p.numel() for p in block.parameters() if not p.requires_grad)
    for method, ranks in run["memory"].items():
        est = estimate_memory(
            directory, method, batch=2, seq=12, rank=4, gpus=2, precision="mixed", target_modules="all-linear"
        )
        whole_block = 2 * (base + (adapters if method == "lora" else 0))  # bf16
        trained_grads = 2 * (base if method == "full" else adapters)
        for measured in ranks:
            assert measured["params"] == est.weights_bytes, (method, measured, est)
            assert measured["grads"] == est.gradients_bytes, (method, measured, est)
            assert measured["optimizer"] == est.optimizer_bytes, (method, measured, est)
            # held whole at a block's forward or backward: the root unit and that block; the estimate also counts the
            # block FSDP prefetches and the block's whole trained gradients, which these points do not see
            assert measured["gathered_peak"] == est.gathered_bytes - whole_block - trained_grads, (method, measured)


def test_the_yaml_example_runs_under_the_strategy(run):
    result = run["yaml"]
    assert result["strategy"] == "FSDP2Strategy" and result["global_step"] == 2
    assert result["plugin"] == "NF4Precision"  # the 4-bit base, sharded
    assert result["options"] == {"mixed_precision": "bf16", "activation_checkpointing": True, "cpu_offload": False}
    assert result["units"] == [f"model.model.layers.{i}" for i in range(4)] + ["model"]
    out = run["root"] / "yaml"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    (ckpt,) = list((out / "checkpoints").glob("*.ckpt"))
    model, payload = _payload(ckpt)
    assert model and all(".lora_" in k for k in model)
    n_trained = sum(math.prod(s) for s in model.values())
    assert payload == 12 * n_trained + 4 * len(model)  # fp32 adapters and AdamW states, one step count per tensor
    base = Path(result["model_dir"]) / "model.safetensors"
    print(f"\nembedded base model {_disk(base):,} B; adapter-only sharded checkpoint {_disk(ckpt):,} B on disk")


def test_refusals(run):
    refused = run["refusals"]
    assert "already applied fully_shard" in refused["manual"] and "model.layers.0" in refused["manual"]
    assert "holds parameters directly (['temperature'])" in refused["own_parameter"]
    assert "differ in shape" in refused["other_rank"] and "saved (4, 32) vs model (2, 32)" in refused["other_rank"]
    assert "cpu_offload=True" in refused["offload_on_cpu"] and "runs on the CPU already" in refused["offload_on_cpu"]
    assert "r='auto' is resolved" in refused["auto_rank"] and "Give the settings explicitly" in refused["auto_rank"]
    layer = refused["dtensor_layer"]
    assert "DTensors outside any FSDP2 unit" in layer["skipped"][""]
    assert any("DTensors outside any FSDP2 unit" in w for w in layer["warnings"])


def test_the_full_finetune_example_saves_the_gathered_weights(run):
    from transformers import AutoModelForCausalLM

    example = run["example"]
    report = example["report"]
    assert report["world_size"] == 2 and report["steps"] == 2 and report["units"] == 5
    saved = AutoModelForCausalLM.from_pretrained(report["saved_to"], dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(run["yaml"]["model_dir"], dtype=torch.float32)
    changed = 0
    for name, value in saved.named_parameters():
        assert torch.equal(value.detach(), example["params"][name]), name  # gathered from the two shards
        changed += not torch.equal(value, base.get_parameter(name))
    assert changed == len(list(saved.parameters()))  # every weight trained


def test_the_forgetting_monitor_under_the_strategy_measures_what_one_process_measures(run, tmp_path):
    path = Path(__file__).resolve().parents[1] / "callbacks" / "test_forgetting_ddp.py"
    spec = importlib.util.spec_from_file_location("forgetting_ddp_checks", path)
    checks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(checks)
    checks._fit(tmp_path, devices=1)
    one = json.loads((tmp_path / "rank0.json").read_text())
    checks._check(one, run["root"] / "monitor")  # the same history on both ranks, equal to one process's; one stop
    (stop,) = list((run["root"] / "monitor" / "forgetting").iterdir())
    model, _ = _payload(stop)  # the stop checkpoint: sharded, adapters only
    assert model and all(".lora_" in k for k in model)

"""Merging saved adapters / fine-tunes into a saved base, streamed: logits, methods, refusals, interruption."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from merging_helpers import adapted, logits, make_adapter
from safetensors.torch import load_file
from zenft_testing import child_env, load_base, tiny_config, tiny_model, token_batch

from lightning_zenft.adapters import find_adapters
from lightning_zenft.merging import merge_pretrained
from lightning_zenft.merging.streaming import INDEX_FILE, PretrainedWeights

peft_merge = pytest.importorskip("peft.utils.merge_utils")

CASES = [
    ("llama", dict(r=4, alpha=8)),
    ("llama", dict(r=4, alpha=8, use_dora=True, rank_pattern={"o_proj": 2})),
    ("gpt2", dict(r=4, alpha=8, use_rslora=True)),
    ("gpt2", dict(r=2, alpha=4, target_modules=["c_attn", "c_fc"], use_dora=True, bias="lora_only")),
    ("mistral", dict(r=4, target_modules="mlp", rank_pattern={"down_proj": 2}, alpha_pattern={"up_proj": 3})),
    ("qwen2", dict(r=4, target_modules="attention", bias="all", modules_to_save=["lm_head"])),
]


def _save_base(path: Path, arch: str = "llama", seed: int = 0, shard: str | None = "20KB", **config) -> Path:
    if config:
        from transformers import AutoModelForCausalLM

        cfg = tiny_config(arch)
        for key, value in config.items():
            setattr(cfg, key, value)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg).float()
    else:
        model = tiny_model(arch, seed)
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    return path


def _all_tensors(directory: Path) -> dict[str, torch.Tensor]:
    weights = PretrainedWeights(directory)
    return {key: weights.read(key) for key in weights.keys()}


@pytest.mark.parametrize(("arch", "lora"), CASES)
def test_merged_model_gives_the_adapted_models_logits(tmp_path, arch, lora):
    base = _save_base(tmp_path / "base", arch)
    model, adapter = make_adapter(base, tmp_path / "adapter", **lora)
    report = merge_pretrained(base, tmp_path / "merged", adapters=[adapter])
    ids = token_batch()
    torch.testing.assert_close(logits(load_base(tmp_path / "merged"), ids), logits(model, ids), atol=1e-5, rtol=1e-5)
    # the base's shard layout and index are kept; tensors no adapter touches are copied bit for bit
    names = sorted(p.name for p in base.iterdir())
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == names
    index = json.loads((tmp_path / "merged" / INDEX_FILE).read_text())
    assert index["weight_map"] == json.loads((base / INDEX_FILE).read_text())["weight_map"]
    before, after = _all_tensors(base), _all_tensors(tmp_path / "merged")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert report.changed == len(changed) > 0 and report.tensors == len(before)
    assert (tmp_path / "merged" / "config.json").read_text() == (base / "config.json").read_text()


def _deltas(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Reference task vector of an adapted in-memory model: merged_weight(W) - W per adapted weight."""
    out = {}
    for name, layer in find_adapters(model):
        weight = layer.base_layer.weight.detach()
        out[f"{name}.weight"] = layer.merged_weight(weight) - weight
    return out


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("task_arithmetic", {}),
        ("ties", {"density": 0.3}),
        ("ties", {"density": 0.5, "majority_sign_method": "frequency"}),
        ("magnitude_prune", {"density": 0.4}),
    ],
)
def test_several_adapters_merge_as_peft_merges_their_task_vectors(tmp_path, method, options):
    base = _save_base(tmp_path / "base", shard=None)
    a, path_a = make_adapter(base, tmp_path / "a", seed=1, r=4, target_modules=["q_proj", "v_proj"])
    b, path_b = make_adapter(base, tmp_path / "b", seed=2, r=2, target_modules=["v_proj", "up_proj"], use_dora=True)
    weights = [0.7, 1.3]
    merge_pretrained(base, tmp_path / "m", adapters=[path_a, path_b], method=method, weights=weights, **options)
    before, after = _all_tensors(base), _all_tensors(tmp_path / "m")
    deltas = [_deltas(a), _deltas(b)]
    peft_fn = getattr(peft_merge, method)
    for key, value in before.items():
        tasks = [d.get(key, torch.zeros_like(value)) for d in deltas]
        if all(not t.any() for t in tasks):
            assert torch.equal(after[key], value), key
            continue
        extra = [options["density"]] if "density" in options else []
        extra += [options["majority_sign_method"]] if "majority_sign_method" in options else []
        want = value + peft_fn(tasks, torch.tensor(weights), *extra)
        torch.testing.assert_close(after[key], want, atol=1e-6, rtol=1e-5, msg=key)


def _fine_tunes(tmp_path: Path, base: Path, n: int = 2) -> list[Path]:
    paths = []
    for i in range(n):
        model = load_base(base)
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        paths.append(tmp_path / f"ft{i}")
        model.save_pretrained(paths[-1])
    return paths


def test_fine_tuned_models_merge_per_tensor_and_over_the_whole_task_vector(tmp_path):
    base = _save_base(tmp_path / "base", shard=None)
    models = _fine_tunes(tmp_path, base)
    weights = [1.0, 0.5]
    report = merge_pretrained(base, tmp_path / "tensor", models=models, method="ties", density=0.3, weights=weights)
    assert report.thresholds is None
    before, after = _all_tensors(base), _all_tensors(tmp_path / "tensor")
    tuned = [_all_tensors(p) for p in models]
    for key, value in before.items():
        want = value + peft_merge.ties([t[key] - value for t in tuned], torch.tensor(weights), 0.3)
        torch.testing.assert_close(after[key], want, atol=1e-6, rtol=1e-5, msg=key)

    report = merge_pretrained(base, tmp_path / "global", models=models, method="ties", density=0.3, trim="global",
                              weights=weights)  # fmt: skip
    assert report.thresholds is not None and len(report.thresholds) == 2
    after = _all_tensors(tmp_path / "global")
    keys = list(before)
    flat = [torch.cat([(t[k] - before[k]).reshape(-1) for k in keys]) for t in tuned]
    want = torch.cat([before[k].reshape(-1) for k in keys]) + peft_merge.ties(flat, torch.tensor(weights), 0.3)
    torch.testing.assert_close(torch.cat([after[k].reshape(-1) for k in keys]), want, atol=1e-6, rtol=1e-5)


def test_dare_merges_are_seeded(tmp_path):
    base = _save_base(tmp_path / "base", shard=None)
    models = _fine_tunes(tmp_path, base)
    for name, seed in [("a", 3), ("b", 3), ("c", 4)]:
        merge_pretrained(base, tmp_path / name, models=models, method="dare_ties", density=0.5, seed=seed)
    a, b, c = (_all_tensors(tmp_path / n) for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)


def test_dtype_and_resharding(tmp_path):
    base = _save_base(tmp_path / "base")
    model, adapter = make_adapter(base, tmp_path / "adapter", r=4)
    merge_pretrained(base, tmp_path / "fp32", adapters=[adapter], max_shard_size="30KB")
    merge_pretrained(base, tmp_path / "bf16", adapters=[adapter], dtype=torch.bfloat16)
    fp32, bf16 = _all_tensors(tmp_path / "fp32"), _all_tensors(tmp_path / "bf16")
    assert all(bf16[k].dtype == torch.bfloat16 and torch.equal(bf16[k], fp32[k].bfloat16()) for k in fp32)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto").dtype == torch.bfloat16
    shards = sorted(p.name for p in (tmp_path / "fp32").glob("*.safetensors"))
    assert shards != sorted(p.name for p in base.glob("*.safetensors")) and len(shards) > 1
    ids = token_batch()
    torch.testing.assert_close(logits(load_base(tmp_path / "fp32"), ids), logits(model, ids), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ refusals
def test_an_adapter_for_another_base_is_refused_by_tensor_name_and_shapes(tmp_path):
    base = _save_base(tmp_path / "base", shard=None)
    other = _save_base(tmp_path / "other", shard=None, intermediate_size=48)
    _, adapter = make_adapter(base, tmp_path / "adapter", target_modules=["up_proj"])
    pattern = (r"tensor model\.layers\.0\.mlp\.up_proj\.weight: the base .*other has shape \(48, 32\) but adapter "
               r".*adapter needs \(64, 32\)")  # fmt: skip
    with pytest.raises(ValueError, match=pattern), pytest.warns(UserWarning, match="made for base"):
        merge_pretrained(other, tmp_path / "m", adapters=[adapter], base_mismatch="warn")
    gpt2 = _save_base(tmp_path / "gpt2", "gpt2", shard=None)
    _, gpt2_adapter = make_adapter(gpt2, tmp_path / "gpt2-adapter", target_modules=["c_attn"])
    with (
        pytest.raises(ValueError, match=r"has no tensor transformer\.h\.0\.attn\.c_attn\.weight"),
        pytest.warns(UserWarning),
    ):
        merge_pretrained(base, tmp_path / "m", adapters=[gpt2_adapter], base_mismatch="warn")
    assert not (tmp_path / "m").exists()


def test_an_adapter_recorded_for_another_base_directory_is_refused_or_warned(tmp_path):
    base = _save_base(tmp_path / "base", shard=None)
    _, adapter = make_adapter(base, tmp_path / "adapter", r=2)
    copy = tmp_path / "copy"
    shutil.copytree(base, copy)
    with pytest.raises(ValueError, match=r"made for base .*base', not .*copy'.*--allow-base-mismatch"):
        merge_pretrained(copy, tmp_path / "m", adapters=[adapter])
    with pytest.warns(UserWarning, match="made for base"):
        report = merge_pretrained(copy, tmp_path / "m", adapters=[adapter], base_mismatch="warn")
    assert any("made for base" in w for w in report.warnings) and (tmp_path / "m").is_dir()

    config_path = adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = None
    config_path.write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="records no base_model_name_or_path"):
        merge_pretrained(base, tmp_path / "m2", adapters=[adapter])
    other = tmp_path / "other-adapter"
    shutil.copytree(adapter, other)
    config["base_model_name_or_path"] = str(copy)
    (other / "adapter_config.json").write_text(json.dumps(config))
    config["base_model_name_or_path"] = str(base)
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="made for different bases"):
        merge_pretrained(base, tmp_path / "m3", adapters=[adapter, other])


def test_fine_tunes_of_another_base_are_refused(tmp_path):
    base = _save_base(tmp_path / "base", shard=None)
    other = _save_base(tmp_path / "other", shard=None, intermediate_size=48)
    pattern = r"tensor model\.layers\.0\.mlp\.down_proj\.weight: the base .*base has shape \(32, 64\) but .*other has \(32, 48\)"  # noqa: E501
    with pytest.raises(ValueError, match=pattern):
        merge_pretrained(base, tmp_path / "m", models=[other])
    gpt2 = _save_base(tmp_path / "gpt2", "gpt2", shard=None)
    with pytest.raises(ValueError, match=r"does not hold the base's tensors: missing \['lm_head\.weight'"):
        merge_pretrained(base, tmp_path / "m", models=[gpt2])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({}, ValueError, "give adapters=.* or models="),
        ({"adapters": ["a"], "models": ["b"]}, ValueError, "one kind of input"),
        ({"models": ["a", "b"], "weights": [1.0]}, ValueError, "got 1 weights for 2 inputs"),
        ({"models": ["a"], "trim": "layer"}, ValueError, "trim='layer'"),
        ({"models": ["a"], "method": "dare_linear", "density": 0.5, "trim": "global"}, ValueError, "whole task vector"),
        ({"models": ["a"], "method": "ties"}, ValueError, "needs a density"),
    ],
)
def test_option_errors(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        merge_pretrained(tmp_path / "base", tmp_path / "out", **kwargs)


def test_never_overwrites_without_overwrite_nor_writes_into_an_input(tmp_path):
    base = _save_base(tmp_path / "base", shard=None)
    _, adapter = make_adapter(base, tmp_path / "adapter", r=2)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        merge_pretrained(base, tmp_path / "out", adapters=[adapter])
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    for target in (base, adapter, base / "merged"):
        with pytest.raises(ValueError, match="is, or overlaps, the input"):
            merge_pretrained(base, target, adapters=[adapter], overwrite=True)
    merge_pretrained(base, tmp_path / "out", adapters=[adapter], overwrite=True)
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------- interruption
def test_an_exception_mid_merge_leaves_no_output(tmp_path):
    base = _save_base(tmp_path / "base")
    _, adapter = make_adapter(base, tmp_path / "adapter", r=2)
    written = []

    def stop_after_three(name: str) -> None:
        written.append(name)
        if len(written) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        merge_pretrained(base, tmp_path / "out", adapters=[adapter], on_tensor=stop_after_three)
    assert len(written) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]  # no output, no partial directory


_KILLED_MERGE = """
import sys, time
from pathlib import Path
from lightning_zenft.merging import merge_pretrained
base, adapter, out, marker = map(Path, sys.argv[1:5])
count = 0
def hook(name):
    global count
    count += 1
    if count == 3:
        marker.write_text(name)
        time.sleep(120)
merge_pretrained(base, out, adapters=[adapter], on_tensor=hook)
"""


@pytest.mark.slow
def test_a_killed_merge_leaves_no_output(tmp_path):
    base = _save_base(tmp_path / "base")
    _, adapter = make_adapter(base, tmp_path / "adapter", r=2)
    out, marker = tmp_path / "out", tmp_path / "marker"
    env = child_env(PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_MERGE, str(base), str(adapter), str(out), str(marker)],
                            env=env, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the merge never reached its third tensor"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists()
    partial = [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]
    assert len(partial) == 1 and any(partial[0].iterdir())  # the killed run's work sits beside, never at, the output
    assert load_file(str(base / "model-00001-of-00007.safetensors"))  # the base is untouched and readable


def test_one_adapter_on_part_of_a_gpt2_model_reads_conv1d_layout(tmp_path):
    base = _save_base(tmp_path / "base", "gpt2", shard=None)
    model = adapted(base, r=2, target_modules=["c_fc"])
    from lightning_zenft import save_adapter

    merge_pretrained(base, tmp_path / "m", adapters=[save_adapter(model, tmp_path / "a")])
    merged = _all_tensors(tmp_path / "m")
    for name, layer in find_adapters(model):
        weight = layer.base_layer.weight.detach()  # (in, out)
        torch.testing.assert_close(merged[f"{name}.weight"], layer.merged_weight(weight.t()).t())

"""Recipe rules: learning-rate interpolation and power law, rank/epoch/data thresholds, method choice, YAML."""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import yaml

from lightning_zenft.planning.memory import estimate_memory
from lightning_zenft.planning.recommend import (
    TASKS,
    data_thresholds,
    full_learning_rate,
    lora_learning_rate,
    lora_learning_rate_rule,
    lora_size_learning_rate,
    recommend,
    recommend_epochs,
    resolve_lora_rank_auto,
)

GIB = 1024**3
SIZES = np.array([0.6e9, 7e9, 32e9])


def loglog_reference(n_params: float, rates: list[float]) -> float:
    """Independent reference: numpy's linear interpolation on logs (clamps at the ends)."""
    return float(np.exp(np.interp(np.log(n_params), np.log(SIZES), np.log(rates))))


@pytest.mark.parametrize("n_params", [0.1e9, 0.6e9, 1.1e9, 2.0e9, 7e9, 13e9, 32e9, 70e9])
def test_size_learning_rates_interpolate_in_log_space(n_params):
    assert full_learning_rate(n_params) == pytest.approx(loglog_reference(n_params, [2e-5, 1e-5, 5e-6]), rel=1e-9)
    assert lora_size_learning_rate(n_params) == pytest.approx(loglog_reference(n_params, [3e-4, 2e-4, 1e-4]))


def test_size_learning_rate_table_points_midpoint_and_clamp():
    assert full_learning_rate(0.6e9) == pytest.approx(2e-5)
    assert full_learning_rate(7e9) == pytest.approx(1e-5)
    assert full_learning_rate(32e9) == pytest.approx(5e-6)
    assert lora_size_learning_rate(7e9) == pytest.approx(2e-4)
    # The geometric mean of two sizes gets the geometric mean of their rates.
    mid = math.sqrt(0.6e9 * 7e9)
    assert full_learning_rate(mid) == pytest.approx(math.sqrt(2e-5 * 1e-5))
    assert lora_size_learning_rate(mid) == pytest.approx(math.sqrt(3e-4 * 2e-4))
    assert full_learning_rate(0.1e9) == full_learning_rate(0.6e9)
    assert lora_size_learning_rate(100e9) == lora_size_learning_rate(32e9)


def test_power_law_sign_matches_the_study_table():
    # Best LoRA rate measured at 7B against dataset size; larger sets tolerate higher rates.
    table = {500: 1e-4, 5_000: 1e-4, 50_000: 3e-4, 500_000: 1e-3}

    def log_error(k: float) -> float:
        return sum((math.log(2e-4 * (n / 1e4) ** k) - math.log(lr)) ** 2 for n, lr in table.items())

    assert log_error(+0.22) < log_error(-0.22) / 10
    assert lora_learning_rate(7e9, 500) == pytest.approx(1.0e-4, rel=0.05)
    assert lora_learning_rate(7e9, 50_000) == pytest.approx(2.9e-4, rel=0.05)
    assert lora_learning_rate(7e9, 500_000) == pytest.approx(4.7e-4, rel=0.05)
    assert lora_learning_rate(7e9, 10_000) == pytest.approx(2e-4)
    rates = [lora_learning_rate(7e9, n) for n in (500, 5_000, 50_000, 500_000)]
    assert rates == sorted(rates)


def test_power_law_is_clamped_to_the_fitted_data_range():
    assert lora_learning_rate(7e9, 100) == lora_learning_rate(7e9, 500)
    assert lora_learning_rate(7e9, 5_000_000) == lora_learning_rate(7e9, 500_000)


@pytest.mark.parametrize("n_params", [0.6e9, 3e9, 32e9])
def test_power_law_scales_with_model_size(n_params):
    for n in (1_000, 20_000):
        expected = 2e-4 * (n / 1e4) ** 0.22 * loglog_reference(n_params, [3e-4, 2e-4, 1e-4]) / 2e-4
        assert lora_learning_rate(n_params, n) == pytest.approx(expected)


@pytest.mark.parametrize("breakpoint", [5_000, 100_000])
def test_power_law_agrees_with_step_rule_at_breakpoints(breakpoint):
    below, above = lora_learning_rate_rule(breakpoint - 1), lora_learning_rate_rule(breakpoint + 1)
    assert below < above  # both rise with data
    assert lora_learning_rate(7e9, breakpoint - 1) < lora_learning_rate(7e9, breakpoint + 1)
    for n, step in ((breakpoint - 1, below), (breakpoint + 1, above)):
        assert 0.5 < lora_learning_rate(7e9, n) / step < 2.0


def test_step_rule_thresholds():
    assert lora_learning_rate_rule(4_999) == 1e-4
    assert lora_learning_rate_rule(5_000) == 2e-4
    assert lora_learning_rate_rule(100_000) == 2e-4
    assert lora_learning_rate_rule(100_001) == 3e-4


def test_rank_thresholds():
    assert resolve_lora_rank_auto(7e9, 4_999) == 16
    assert resolve_lora_rank_auto(7e9, 5_000) == 32
    assert resolve_lora_rank_auto(7e9, 10_000) == 32
    assert resolve_lora_rank_auto(7e9, 10_001) == 64
    with pytest.raises(ValueError, match="n_samples=0"):
        resolve_lora_rank_auto(7e9, 0)


def test_epoch_thresholds():
    assert recommend_epochs(100) == 5 and recommend_epochs(4_999) == 5
    assert recommend_epochs(5_000) == 3 and recommend_epochs(100_000) == 3
    assert recommend_epochs(100_001) == 2 and recommend_epochs(500_000) == 2
    assert recommend_epochs(500_001) == 1


def test_data_thresholds_scale_as_n_to_the_0_3():
    for task, (low, mid, high) in TASKS.items():
        assert data_thresholds(task, 7e9) == {"minimum": low, "recommended": mid, "saturation": high}
    scale = (0.6e9 / 7e9) ** 0.3
    assert data_thresholds("code-repository", 0.6e9) == {
        "minimum": round(20_000 * scale),
        "recommended": round(100_000 * scale),
        "saturation": round(1_000_000 * scale),
    }
    big, small = data_thresholds("domain-adaptation", 64e9), data_thresholds("domain-adaptation", 2e9)
    assert big["saturation"] / small["saturation"] == pytest.approx(32**0.3, rel=1e-5)
    with pytest.raises(ValueError, match="Valid tasks: classification, ner"):
        data_thresholds("poetry", 7e9)


@pytest.mark.parametrize("task", ["classification", "instruction-complex"])
def test_data_verdict_on_both_sides_of_each_threshold(task):
    t = data_thresholds(task, 1.1e9)
    assert recommend("1.1B", task, t["minimum"] - 1).data_verdict == "below minimum"
    assert recommend("1.1B", task, t["minimum"]).data_verdict == "fine"
    assert recommend("1.1B", task, t["saturation"]).data_verdict == "fine"
    assert recommend("1.1B", task, t["saturation"] + 1).data_verdict == "past saturation"
    rec = recommend("1.1B", task, t["minimum"])
    assert rec.data_thresholds == t
    assert f"{t['saturation']:,}" in rec.reasons["data"]


def test_full_finetuning_conditions():
    assert recommend("7B", "ner", 20_000).method == "lora"
    assert recommend("7B", "ner", 20_000, divergent=True).method == "full"
    assert recommend("7B", "ner", 20_000, max_performance=True).method == "full"
    assert recommend("7B", "ner", 20_000, nodes=2).method == "full"
    assert recommend("7B", "ner", 500_000).method == "lora"
    rec = recommend("7B", "ner", 500_001)
    assert rec.method == "full" and "500,000" in rec.reasons["method"]
    assert rec.rank is None and rec.alpha is None and rec.target_modules is None
    assert rec.learning_rate == pytest.approx(full_learning_rate(7e9))


def lora_settings(method: str, gpus: int = 1, checkpointing: bool = False) -> dict:
    """What a recommended run is estimated with: bf16 weights, dropout 0.05, rank 64 (20K samples)."""
    return dict(rank=64, precision="bf16", lora_dropout=0.05, gpus=gpus, checkpointing=checkpointing)


def test_qlora_when_bf16_base_does_not_fit_but_4bit_does():
    lora = estimate_memory("7B", "lora", **lora_settings("lora")).total_bytes
    qlora = estimate_memory("7B", "qlora", **lora_settings("qlora")).total_bytes
    between = (lora + qlora) / 2 / 0.9 / GIB  # GiB such that 90% of it lies between the two estimates
    rec = recommend("7B", "instruction-simple", 20_000, gpu_mem_gb=between, qlora_available=True)
    assert (rec.method, rec.checkpointing, rec.fits) == ("qlora", False, True)
    assert "does not fit" in rec.reasons["method"] and "qlora fits" in rec.reasons["memory"]
    assert rec.memory_bytes == {"full": rec.memory_bytes["full"], "lora": lora, "qlora": qlora}
    fits_lora = recommend("7B", "instruction-simple", 20_000, gpu_mem_gb=lora / 0.9 / GIB * 1.01, qlora_available=True)
    assert fits_lora.method == "lora"
    tiny = recommend("7B", "instruction-simple", 20_000, gpu_mem_gb=4, qlora_available=True)
    assert (tiny.method, tiny.checkpointing, tiny.fits) == ("qlora", True, False)  # the closest to fitting
    assert "nothing this lightning_zenft can run fits: even QLoRA with gradient checkpointing" in tiny.reasons["method"]
    assert "does NOT fit" in tiny.reasons["memory"]


def test_without_the_4bit_plugin_qlora_is_named_but_not_recommended():
    """The issue's case: 7B, 20K samples, 24 GiB. QLoRA would be the pick; LoRA with checkpointing is what runs."""
    rec = recommend("7B", "instruction-simple", 20_000, gpu_mem_gb=24, qlora_available=False)
    qlora = estimate_memory("7B", "qlora", **lora_settings("qlora")).total_bytes
    lora_ckpt = estimate_memory("7B", "lora", **lora_settings("lora", checkpointing=True)).total_bytes
    assert qlora <= 0.9 * 24 * GIB and lora_ckpt <= 0.9 * 24 * GIB  # both fit: QLoRA comes first in the chain
    assert (rec.method, rec.checkpointing, rec.fits) == ("lora", True, True)
    assert "QLoRA) would fit" in rec.reasons["method"] and "no NF4Precision plugin" in rec.reasons["method"]
    config = yaml.safe_load(rec.to_yaml())
    assert "plugins" not in config["trainer"] and config["model"]["gradient_checkpointing"] is True
    none_fit = recommend("7B", "instruction-simple", 20_000, gpu_mem_gb=4, qlora_available=False)
    assert (none_fit.method, none_fit.fits) == ("lora", False)
    assert "a lightning_zenft with the NF4Precision plugin" in none_fit.reasons["method"]


def test_checkpointing_is_turned_on_only_when_nothing_fits_without_it():
    lora = estimate_memory("7B", "lora", **lora_settings("lora")).total_bytes
    rec = recommend("7B", "instruction-simple", 20_000, gpu_mem_gb=lora / 0.9 / GIB * 1.01, qlora_available=False)
    assert (rec.method, rec.checkpointing) == ("lora", False)
    asked = recommend("7B", "instruction-simple", 20_000, gpu_mem_gb=80, checkpointing=True)
    assert (
        asked.checkpointing
        and asked.memory_bytes["lora"]
        == estimate_memory("7B", "lora", **lora_settings("lora", checkpointing=True)).total_bytes
    )


def test_full_finetuning_falls_back_when_it_does_not_fit():
    rec = recommend("7B", "ner", 20_000, gpu_mem_gb=80, divergent=True)
    assert rec.method == "lora"
    assert "diverges" in rec.reasons["method"] and "falling back to the bf16 base with LoRA" in rec.reasons["method"]
    # Sharded over 2 nodes x 8 GPUs it fits: 112 GB / 16 plus activations.
    sharded = recommend("7B", "ner", 20_000, gpu_mem_gb=80, nodes=2, gpus=8)
    assert sharded.method == "full"
    expected = estimate_memory("7B", "full", gpus=16).total_bytes
    assert sharded.memory_bytes["full"] == expected < 0.9 * 80 * GIB


def test_adapters_are_sharded_like_full_finetuning():
    """The issue's case: 70B, 600K samples, 80 GiB, 8 GPUs x 2 nodes: every figure per GPU over 16 GPUs."""
    rec = recommend("70B", "instruction-simple", 600_000, gpu_mem_gb=80, gpus=8, nodes=2, qlora_available=True)
    for method in ("lora", "qlora"):
        assert rec.memory_bytes[method] == estimate_memory("70B", method, **lora_settings(method, 16, True)).total_bytes
    assert rec.memory_bytes["full"] == estimate_memory("70B", "full", gpus=16, checkpointing=True).total_bytes
    assert rec.fits and rec.memory_bytes[rec.method] <= 0.9 * 80 * GIB
    assert f"{rec.method} fits" in rec.reasons["memory"]


@pytest.mark.parametrize(
    ("kwargs", "method"),
    [({}, "lora"), ({"gpu_mem_gb": 24, "qlora_available": True}, "qlora"),
     ({"nodes": 4, "gpus": 8, "gpu_mem_gb": 80}, "full")],
)  # fmt: skip
def test_yaml_follows_the_fit_schema(kwargs, method):
    rec = recommend("7B", "instruction-simple", 20_000, batch=2, seq=1024, **kwargs)
    assert rec.method == method
    config = yaml.safe_load(rec.to_yaml(max_steps=50))
    assert set(config) == {"seed_everything", "trainer", "model", "data"}
    assert config["seed_everything"] == 0
    assert config["trainer"]["max_epochs"] == rec.epochs == 3 and config["trainer"]["max_steps"] == 50
    callbacks = {cb["class_path"]: cb["init_args"] for cb in config["trainer"]["callbacks"]}
    stopping = {"monitor": "val_loss", "patience": 2, "check_on_train_epoch_end": False}
    assert callbacks["lightning.pytorch.callbacks.EarlyStopping"] == stopping
    if method == "full":
        assert "lightning_zenft.LoRA" not in callbacks and "lightning_zenft.SaveAdapter" not in callbacks
        assert config["trainer"]["precision"] == "bf16-mixed"
        assert config["model"] == {"model": "7B", "learning_rate": rec.learning_rate}
    else:
        assert callbacks["lightning_zenft.LoRA"] == {"r": 64, "alpha": 128, "target_modules": "all-linear",
                                                     "dropout": 0.05}  # fmt: skip
        assert callbacks["lightning_zenft.SaveAdapter"] == {"dirpath": "adapter"}
        assert config["model"] == {"model": "7B", "learning_rate": rec.learning_rate, "torch_dtype": "bfloat16"}
    plugins = config["trainer"].get("plugins", [])
    assert (plugins == [{"class_path": "lightning_zenft.NF4Precision"}]) == (method == "qlora")
    multi = {"devices": 8, "num_nodes": 4, "strategy": {"class_path": "lightning_zenft.strategies.FSDP2Strategy"}}
    assert {k: config["trainer"].get(k) for k in multi} == (multi if "nodes" in kwargs else dict.fromkeys(multi))
    if "nodes" in kwargs:  # the class path the YAML names imports, and builds with the file's (default) settings
        from lightning_zenft.strategies import FSDP2Strategy

        module_name, _, name = multi["strategy"]["class_path"].rpartition(".")
        assert getattr(importlib.import_module(module_name), name) is FSDP2Strategy
        assert FSDP2Strategy().mixed_precision == "bf16"  # the bf16 sharded split zenft estimate --gpus counts
    assert config["data"] == {"train_file": "train.jsonl", "val_fraction": 0.05, "batch_size": 2, "max_length": 1024}


def test_recommended_rates_are_the_laws_rounded():
    rec = recommend("0.6B", "classification", 3_000)
    assert (rec.method, rec.rank, rec.alpha, rec.epochs) == ("lora", 16, 32, 5)
    assert rec.learning_rate == pytest.approx(lora_learning_rate(0.6e9, 3_000), rel=0.05)
    assert set(rec.reasons) == {"data", "memory", "method", "rank", "learning_rate", "epochs"}
    assert "early" in rec.reasons["epochs"]


def test_yaml_says_what_to_set_before_it_runs(tmp_path):
    text = recommend("7B", "instruction-simple", 20_000, 24).to_yaml()
    assert text.startswith("# Before running: set model.model to the model's directory: '7B' is a size")
    assert "# Before running: write the training data to 'train.jsonl'" in text
    assert yaml.safe_load(text)["model"]["model"] == "7B"
    from lightning_zenft.data import DEFAULT_BASE_MODEL_DIR, DEFAULT_TASK_FILE

    runnable = recommend(str(DEFAULT_BASE_MODEL_DIR), "instruction-simple", 2_000)
    assert not runnable.to_yaml(train_file=str(DEFAULT_TASK_FILE)).startswith("#")
    too_big = recommend(str(DEFAULT_BASE_MODEL_DIR), "instruction-simple", 2_000, gpu_mem_gb=1e-4)
    assert too_big.fits is False
    assert too_big.to_yaml(train_file=str(DEFAULT_TASK_FILE)).startswith("# Before running: the run does NOT fit")

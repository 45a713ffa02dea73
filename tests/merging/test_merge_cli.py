"""`zenft merge` on saved tiny models: results equal the Python API, progress bar, refusals, --overwrite."""

from __future__ import annotations

import json

import pytest
import torch
from merging_helpers import logits, make_adapter
from zenft_testing import load_base, tiny_config, tiny_model, token_batch

from lightning_zenft.cli import main
from lightning_zenft.merging import combine_adapters, merge_pretrained
from lightning_zenft.merging.streaming import PretrainedWeights


def _tensors(directory):
    weights = PretrainedWeights(directory)
    return {key: weights.read(key) for key in weights.keys()}


@pytest.fixture
def saved(tmp_path):
    base = tmp_path / "base"
    tiny_model("llama").save_pretrained(base, max_shard_size="20KB")
    model_a, a = make_adapter(base, tmp_path / "a", seed=1, r=4, target_modules=["q_proj", "v_proj"])
    _, b = make_adapter(base, tmp_path / "b", seed=2, r=4, target_modules=["v_proj", "up_proj"])
    return base, a, b, model_a


def test_merge_one_adapter_with_a_progress_bar(tmp_path, saved, capsys):
    base, a, _, model_a = saved
    assert main(["merge", "--base", str(base), "--adapters", str(a), "--out", str(tmp_path / "m")]) == 0
    captured = capsys.readouterr()
    assert "merging" in captured.err and "100%" in captured.err  # the progress bar (on stderr)
    assert f"merged 1 adapters into {tmp_path / 'm'} (task_arithmetic): 21 tensors, 4 changed" in captured.out
    ids = token_batch()
    torch.testing.assert_close(logits(load_base(tmp_path / "m"), ids), logits(model_a, ids), atol=1e-5, rtol=1e-5)


def test_methods_and_options_reach_the_merge(tmp_path, saved, capsys):
    base, a, b, _ = saved
    args = ["merge", "--base", str(base), "--adapters", str(a), str(b), "--method", "dare_ties", "--density", "0.5",
            "--weights", "1.0", "0.5", "--seed", "3", "--majority-sign", "frequency", "--dtype", "bfloat16",
            "--max-shard-size", "1MB", "--no-progress", "--out", str(tmp_path / "cli")]  # fmt: skip
    assert main(args) == 0
    assert capsys.readouterr().err == ""
    merge_pretrained(base, tmp_path / "api", adapters=[a, b], method="dare_ties", density=0.5, weights=[1.0, 0.5],
                     seed=3, majority_sign_method="frequency", dtype=torch.bfloat16, max_shard_size="1MB")  # fmt: skip
    cli, api = _tensors(tmp_path / "cli"), _tensors(tmp_path / "api")
    assert cli.keys() == api.keys() and all(torch.equal(cli[k], api[k]) for k in cli)
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == ["config.json", "generation_config.json",
                                                                      "model.safetensors"]  # fmt: skip
    args = ["merge", "--base", str(base), "--adapters", str(a), str(b), "--method", "ties", "--density", "0.2",
            "--trim", "global", "--no-progress", "--out", str(tmp_path / "global")]  # fmt: skip
    assert main(args) == 0
    assert "trim thresholds over each task vector: " in capsys.readouterr().out


def test_fine_tuned_models(tmp_path, saved):
    base = saved[0]
    tuned = load_base(base)
    with torch.no_grad():
        tuned.model.layers[0].mlp.up_proj.weight.add_(1.0)
    tuned.save_pretrained(tmp_path / "ft")
    args = ["merge", "--base", str(base), "--models", str(tmp_path / "ft"), "--weights", "0.25", "--no-progress",
            "--out", str(tmp_path / "m")]  # fmt: skip
    assert main(args) == 0
    before, after = _tensors(base), _tensors(tmp_path / "m")
    key = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(after[key], before[key] + 0.25)
    assert all(torch.equal(after[k], before[k]) for k in before if k != key)


def test_combining_into_one_adapter_and_the_factor_route(tmp_path, saved, capsys):
    base, a, b, _ = saved
    args = ["merge", "--adapters", str(a), str(b), "--save-adapter", "--rank", "2", "--out", str(tmp_path / "ab")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "ranks [2], largest SVD truncation error" in out
    config = json.loads((tmp_path / "ab" / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["lora_alpha"] == 2
    report = combine_adapters([a, b], tmp_path / "api", rank=2)
    assert f"{report.max_error:.3g}" in out

    args = ["merge", "--base", str(base), "--adapters", str(a), str(b), "--combine", "factors", "--method", "ties",
            "--density", "0.5", "--no-progress", "--out", str(tmp_path / "factors")]  # fmt: skip
    assert main(args) == 0
    combine_adapters([a, b], tmp_path / "combined", combine="factors", method="ties", density=0.5)
    merge_pretrained(base, tmp_path / "factors-api", adapters=[tmp_path / "combined"])
    cli, api = _tensors(tmp_path / "factors"), _tensors(tmp_path / "factors-api")
    assert all(torch.equal(cli[k], api[k]) for k in cli)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left


def test_refusals_name_the_tensor_the_shapes_and_the_way_out(tmp_path, saved, capsys):
    base, a, _, _ = saved
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama")
    config.intermediate_size = 48
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "other")
    _, up = make_adapter(base, tmp_path / "up", target_modules=["up_proj"])
    out = str(tmp_path / "m")
    assert main(["merge", "--base", str(tmp_path / "other"), "--adapters", str(up), "--out", out]) == 1
    err = capsys.readouterr().err
    assert "was made for base" in err and "--allow-base-mismatch" in err
    assert main(["merge", "--base", str(tmp_path / "other"), "--adapters", str(up), "--allow-base-mismatch",
                 "--out", out]) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert "tensor model.layers.0.mlp.up_proj.weight: the base" in err and "(48, 32)" in err and "(64, 32)" in err

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "mine.txt").write_text("keep")
    assert main(["merge", "--base", str(base), "--adapters", str(a), "--out", out]) == 1
    assert "already exists; pass overwrite=True (zenft merge --overwrite)" in capsys.readouterr().err
    assert (tmp_path / "m" / "mine.txt").read_text() == "keep"
    assert main(["merge", "--base", str(base), "--adapters", str(a), "--out", out, "--overwrite"]) == 0
    assert not (tmp_path / "m" / "mine.txt").exists()


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--adapters", "a", "--out", "o"], "--base is required"),
        (["--base", "b", "--adapters", "a", "--rank", "2", "--out", "o"], "--rank applies to --save-adapter"),
        (["--models", "a", "--save-adapter", "--out", "o"], "does not take --models"),
        (["--base", "b", "--models", "a", "--combine", "factors", "--out", "o"], "not --models"),
        (["--adapters", "a", "--save-adapter", "--trim", "global", "--out", "o"], "--trim global applies"),
        (
            ["--base", "b", "--adapters", "a", "--combine", "factors", "--trim", "global", "--out", "o"],
            "not to combined",
        ),
        (["--adapters", "a", "--save-adapter", "--dtype", "bfloat16", "--out", "o"], "--dtype and --max-shard-size"),
        (["--base", "b", "--adapters", "a", "--models", "m", "--out", "o"], "not allowed with argument"),
        (["--base", "b", "--adapters", "a", "--method", "slerp", "--out", "o"], "invalid choice: 'slerp'"),
    ],
)
def test_usage_errors(args, match, capsys):
    assert main(["merge", *args]) == 2
    assert match in capsys.readouterr().err

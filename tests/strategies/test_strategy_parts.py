"""The strategies' parts that need no process group: block classes, options, FSDP1 units, activation checkpointing,
checkpoint key checks, optimizer re-keying, the trained-only mark, and the estimator's FSDP split."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zenft_testing import TinyLM, make_trainer, tiny_model, token_batch

from lightning_zenft import DoRA, LoRA, LoRAConfig, estimate_memory, inject_adapters
from lightning_zenft.strategies import (
    FSDP1Strategy,
    FSDP2Strategy,
    gathered_for_export,
    is_sharded,
    plan_units,
    resolve_block_classes,
    trained_only_keys,
)
from lightning_zenft.strategies.blocks import cast_frozen, checkpoint_blocks
from lightning_zenft.strategies.checkpoints import _keyed_by_name, check_keys, mark_trained_only


# ------------------------------------------------------------------------------------------------ block classes
@pytest.mark.parametrize(("arch", "block"), [("llama", "LlamaDecoderLayer"), ("gpt2", "GPT2Block")])
def test_block_classes_come_from_no_split_modules(arch, block):
    assert [c.__name__ for c in resolve_block_classes(tiny_model(arch))] == [block]
    assert [c.__name__ for c in resolve_block_classes(TinyLM(arch))] == [block]  # through a LightningModule
    assert [c.__name__ for c in resolve_block_classes(tiny_model(arch), [block])] == [block]


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.tanh(self.up(x)))


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(Block(), Block(), Block())
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


def test_block_class_errors_name_what_the_model_holds():
    with pytest.raises(ValueError, match=r"found no transformer block class in Plain.*model: \['Block'\]"):
        resolve_block_classes(Plain())
    assert resolve_block_classes(Plain(), ["Block"]) == {Block}
    with pytest.raises(ValueError, match=r"\['DecoderLayer'\] not found in Plain.*\['Block'\]"):
        resolve_block_classes(Plain(), ["DecoderLayer"])
    for bad in ("Block", 5, ["Block", 3]):
        with pytest.raises(ValueError, match="block_classes="):
            resolve_block_classes(Plain(), bad)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------------ options
@pytest.mark.parametrize("cls", [FSDP2Strategy, FSDP1Strategy])
def test_bad_options_are_listed_in_one_error(cls):
    with pytest.raises(ValueError) as err:
        cls(block_classes="Block", mixed_precision="fp16", state_dict="dcp", activation_checkpointing="yes")
    message = str(err.value)
    parts = ("block_classes='Block'", "mixed_precision='fp16'", "state_dict='dcp'", "activation_checkpointing='yes'")
    assert all(part in message for part in parts), message
    with pytest.raises(ValueError, match=r"block_classes=\[\]"):
        cls(block_classes=[])
    with pytest.raises(ValueError, match="cpu_offload=1"):
        cls(cpu_offload=1)


def test_options_map_to_lightnings_strategies():
    fsdp2 = FSDP2Strategy(state_dict="full", block_classes=["LlamaDecoderLayer"])
    assert fsdp2._save_distributed_checkpoint is False and fsdp2._tensor_parallel_size == 1
    assert FSDP2Strategy()._save_distributed_checkpoint is True
    fsdp1 = FSDP1Strategy(mixed_precision="bf16", cpu_offload=True, sharding_strategy="HYBRID_SHARD")
    mp = fsdp1.mixed_precision_config
    assert (mp.param_dtype, mp.reduce_dtype, mp.buffer_dtype) == (torch.bfloat16, torch.float32, torch.bfloat16)
    assert fsdp1.cpu_offload.offload_params is True and fsdp1.kwargs["use_orig_params"] is True
    assert fsdp1.sharding_strategy.name == "HYBRID_SHARD"
    plain = FSDP1Strategy(mixed_precision=None)  # the Trainer's precision= decides, as in Lightning's FSDPStrategy
    assert plain.mixed_precision is None and plain.mixed_precision_config.param_dtype == torch.float32


# ----------------------------------------------------------------------------------------------- FSDP1 units
def _units(module: nn.Module, classes: set[type[nn.Module]]):
    plan = plan_units(module, classes)
    return plan, set(plan.names)


def test_fsdp1_units_keep_adapters_apart_from_frozen_weights():
    module = TinyLM("llama")
    inject_adapters(module.model, LoRAConfig(r=2, target_modules="all-linear"))
    classes = resolve_block_classes(module)
    plan, names = _units(module, classes)
    blocks = {f"model.model.layers.{i}" for i in range(2)}
    leaves = {n for n, m in module.named_modules() if n.endswith((".lora_A", ".lora_B"))}
    assert names == blocks | leaves and len(leaves) == 28
    assert plan.mixed == []  # every flat parameter is all frozen or all trained
    assert plan.frozen_units == blocks | {""}
    for name, p in module.named_parameters():  # each trained tensor is in its own adapter unit
        unit = plan.unit_of[id(p)]
        assert unit == (name.rsplit(".", 1)[0] if p.requires_grad else unit) and (unit in leaves) == p.requires_grad


def test_fsdp1_units_of_full_finetuning_and_of_mixed_modules():
    full = TinyLM("llama")
    plan, names = _units(full, resolve_block_classes(full))
    assert names == {"model.model.layers.0", "model.model.layers.1"} and plan.mixed == [] and not plan.frozen_units
    dora = TinyLM("llama")
    inject_adapters(dora.model, LoRAConfig(r=2, use_dora=True, target_modules=["q_proj"]))
    plan, _ = _units(dora, resolve_block_classes(dora))
    assert plan.mixed == ["model.model.layers.0", "model.model.layers.1"]  # the magnitude beside frozen weights
    biased = TinyLM("qwen2")
    inject_adapters(biased.model, LoRAConfig(r=2, bias="all", target_modules=["q_proj"]))
    plan, _ = _units(biased, resolve_block_classes(biased))
    assert plan.mixed == ["model.model.layers.0", "model.model.layers.1"]  # trained biases of frozen layers
    head = TinyLM("llama")
    inject_adapters(head.model, LoRAConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    plan, names = _units(head, resolve_block_classes(head))
    assert "model.lm_head" in names and plan.mixed == [] and "" in plan.frozen_units


def test_cast_frozen_stores_frozen_weights_in_bf16_only():
    model = tiny_model("llama")
    inject_adapters(model, LoRAConfig(r=2))
    frozen = sum(1 for p in model.parameters() if not p.requires_grad)
    assert cast_frozen(model, torch.bfloat16) == frozen
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), name


# --------------------------------------------------------------------------------- activation checkpointing
def _saved_and_grads(model: nn.Module, run) -> tuple[int, dict[str, torch.Tensor]]:
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = run(model)
    loss.backward()
    return sum(saved.values()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_checkpointing_plain_blocks_with_torch():
    torch.manual_seed(0)
    model = Plain()
    x = torch.randn(64, 8)
    run = lambda m: m(x).square().mean()
    plain_bytes, plain_grads = _saved_and_grads(model, run)
    model.zero_grad(set_to_none=True)
    assert checkpoint_blocks(model, list(model.blocks), torch_fallback=False) == {
        "transformers": 0,
        "torch": 0,
        "other": 3,
    }
    assert checkpoint_blocks(model, list(model.blocks)) == {"transformers": 0, "torch": 3, "other": 0}
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in Plain().named_parameters()]  # names kept
    ckpt_bytes, ckpt_grads = _saved_and_grads(model, run)
    assert ckpt_bytes < 0.5 * plain_bytes
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=0, atol=0)


def test_checkpointing_hugging_face_layers_turns_the_cache_off_while_training():
    ids = token_batch(2, 12, seed=1)
    run = lambda m: m(input_ids=ids, labels=ids, attention_mask=torch.ones_like(ids)).loss
    model = tiny_model("llama").train()
    plain_bytes, plain_grads = _saved_and_grads(model, run)
    model.zero_grad(set_to_none=True)
    ways = checkpoint_blocks(model, list(model.model.layers))
    assert ways == {"transformers": 2, "torch": 0, "other": 0}
    ckpt_bytes, ckpt_grads = _saved_and_grads(model, run)
    assert ckpt_bytes < 0.5 * plain_bytes
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------ checkpoint checks
def test_checkpoint_key_checks():
    module = TinyLM("llama")
    inject_adapters(module.model, LoRAConfig(r=2, target_modules=["q_proj"]))
    current = module.state_dict()
    trained = {n for n, p in module.named_parameters() if p.requires_grad}
    shapes = {k: tuple(v.shape) for k, v in current.items()}
    adapters_only = {k: s for k, s in shapes.items() if k in trained}
    check_keys("c", shapes, current, module, strict=True)  # a whole checkpoint
    with pytest.raises(RuntimeError, match=r"expects every tensor of the model: 21 tensors are missing"):
        check_keys("c", adapters_only, current, module, strict=True)
    mark_trained_only(module, trained)
    check_keys("c", adapters_only, current, module, strict=True)  # frozen tensors may be absent
    one = sorted(trained)[0]
    with pytest.raises(RuntimeError, match=rf"expects trained tensors only: 1 trained tensors are missing .*{one}"):
        check_keys("c", {k: s for k, s in adapters_only.items() if k != one}, current, module, strict=True)
    with pytest.raises(RuntimeError, match=r"1 tensors are not in the model \(e.g. \['model.extra'\]\)"):
        check_keys("c", {**adapters_only, "model.extra": (1,)}, current, module, strict=True)
    bad = {**adapters_only, one: (3, 3)}
    with pytest.raises(RuntimeError, match=rf"1 tensors differ in shape \({one}: saved \(3, 3\) vs model"):
        check_keys("c", bad, current, module, strict=False)
    check_keys("c", {"model.extra": (1,)}, current, module, strict=False)  # strict_loading=False: names forgiven


def test_optimizer_state_of_a_plain_run_is_keyed_by_name():
    model = tiny_model("llama")
    inject_adapters(model, LoRAConfig(r=2, target_modules=["q_proj", "v_proj"]))
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": trained[:3]}, {"params": trained[3:], "lr": 0.5}])
    ids = token_batch(2, 8)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    saved = optimizer.state_dict()
    keyed = _keyed_by_name(saved, model, optimizer)
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for p in trained]
    assert [g["params"] for g in keyed["param_groups"]] == [order[:3], order[3:]]
    assert keyed["param_groups"][1]["lr"] == 0.5
    for i, name in enumerate(order):
        assert torch.equal(keyed["state"][name]["exp_avg"], saved["state"][i]["exp_avg"])
    assert _keyed_by_name(keyed, model, optimizer) is keyed  # already by name
    fewer = torch.optim.AdamW(trained[:2])
    with pytest.raises(RuntimeError, match="holds 8 tensors but this run's holds 2"):
        _keyed_by_name(saved, model, fewer)


def test_adapter_callbacks_mark_the_module_trained_only(tmp_path):
    module = TinyLM("llama")
    lora = LoRA(r=2)
    make_trainer(tmp_path, [lora], max_steps=1).fit(module)
    assert trained_only_keys(module) == frozenset(lora._trainable_keys) and lora._trainable_keys
    full = TinyLM("llama")
    make_trainer(tmp_path, [DoRA(r=2, save_full_state_dict=True)], max_steps=1).fit(full)
    assert trained_only_keys(full) is None


def test_gathering_a_model_that_is_not_sharded_changes_nothing(tmp_path):
    module = TinyLM("llama")
    make_trainer(tmp_path, [LoRA(r=2)], max_steps=1).fit(module)
    before = {n: p for n, p in module.named_parameters()}
    assert not is_sharded(module)
    with gathered_for_export(module, rank_zero=True):
        assert all(p is before[n] for n, p in module.named_parameters())


# ------------------------------------------------------------------------------------------------ the estimate
def test_fsdp_split_keeps_the_total_of_sixteen_bytes_a_parameter():
    one = estimate_memory("7B", "full", seq=512)
    eight = estimate_memory("7B", "full", seq=512, gpus=8)
    n = eight.n_params
    assert (eight.weights_bytes, eight.gradients_bytes, eight.optimizer_bytes) == (n // 2, n // 2, n)  # 4, 4, 8 / 8
    assert one.static_bytes == 16 * n == 8 * eight.static_bytes
    assert one.gathered_bytes == 0 and eight.gathered_bytes > 0
    assert eight.total_bytes == eight.static_bytes + eight.gathered_bytes + eight.activations_bytes
    lora_one, lora_two = (estimate_memory("7B", "lora", seq=512, gpus=g) for g in (1, 2))
    assert lora_two.static_bytes == pytest.approx(lora_one.static_bytes / 2, abs=2)


def test_bitsandbytes_4bit_layers_become_shardable_or_are_refused():
    bnb = pytest.importorskip("bitsandbytes")
    from lightning_zenft import NF4Precision
    from lightning_zenft.precision.sharded_linear import ShardedLinear4bit
    from lightning_zenft.strategies.blocks import shardable_4bit

    assert shardable_4bit(nn.Sequential(nn.Linear(4, 4)), "FSDP2Strategy") == 0  # nothing to convert
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64)).requires_grad_(False)
    NF4Precision(compute_dtype=torch.float32).convert_module(model)
    x = torch.randn(3, 64)
    before = model(x)
    assert shardable_4bit(model, "FSDP2Strategy") == 2
    assert isinstance(model[0], ShardedLinear4bit) and isinstance(model[2], ShardedLinear4bit)
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)  # the same 4-bit storage, not re-quantized
    # a Linear4bit built by hand on CPU holds no 4-bit storage yet: refused with the way out
    raw = nn.Sequential(nn.Linear(16, 16), bnb.nn.Linear4bit(16, 16, quant_type="nf4"))
    with pytest.raises(
        RuntimeError, match=r"FSDP2Strategy: '1' is a bitsandbytes Linear4bit whose weight is not quan"
    ) as err:
        shardable_4bit(raw, "FSDP2Strategy")
    assert "let NF4Precision quantize them" in str(err.value)


def test_fsdp1_refuses_a_4bit_base_and_names_fsdp2():
    pytest.importorskip("bitsandbytes")
    from lightning_zenft import NF4Precision
    from lightning_zenft.strategies.blocks import refuse_4bit, shardable_4bit

    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)).requires_grad_(False)
    refuse_4bit(model, "FSDP1Strategy")  # full precision: accepted
    NF4Precision(compute_dtype=torch.float32).convert_module(model)
    with pytest.raises(RuntimeError, match=r"FSDP1Strategy: 2 parameters are 4-bit weights .*Use FSDP2Strategy"):
        refuse_4bit(model, "FSDP1Strategy")
    shardable_4bit(model, "FSDP2Strategy")  # the packed form FSDP2 shards: still not for FSDP1
    with pytest.raises(RuntimeError, match=r"FSDP1Strategy: 2 parameters are 4-bit"):
        refuse_4bit(model, "FSDP1Strategy")


def test_trained_parameters_get_one_dtype_or_a_clear_error():
    from lightning_zenft.strategies.blocks import cast_trained, trained_dtypes

    # adapters take their base's dtype: a bf16 layer (kept unquantized beside 4-bit ones) gives bf16 adapters
    model = tiny_model("llama")
    inject_adapters(model, LoRAConfig(r=2, target_modules=["q_proj", "down_proj"]))
    model.model.layers[0].mlp.down_proj.to(torch.bfloat16)
    frozen = {n: p.dtype for n, p in model.named_parameters() if not p.requires_grad}
    dtypes = trained_dtypes(model)
    assert set(dtypes) == {torch.float32, torch.bfloat16}
    assert dtypes[torch.bfloat16] == [f"model.layers.0.mlp.down_proj.lora_{x}.weight" for x in "AB"]
    module = TinyLM("llama")  # a LightningModule holding the model, as FSDP2Strategy shards it
    module.model = model
    with pytest.raises(ValueError, match=r"mixed_precision=None\): the trained parameters have several dtypes"):
        FSDP2Strategy(mixed_precision=None)._shard(module)
    assert cast_trained(model, torch.float32) == dtypes[torch.bfloat16]
    assert set(trained_dtypes(model)) == {torch.float32}
    assert {n: p.dtype for n, p in model.named_parameters() if not p.requires_grad} == frozen  # frozen untouched

"""The memory estimator against arithmetic and against bytes measured on tiny Llama models (CPU)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_zenft import LoRAConfig, inject_adapters
from lightning_zenft.planning.measure import saved_activation_bytes
from lightning_zenft.planning.memory import NF4_BITS_PER_WEIGHT, estimate_memory, resolve_target_modules
from lightning_zenft.planning.model_info import LINEAR_NAMES, resolve_model

TOLERANCE = 0.15  # the estimate against a different measurement (reentrant checkpointing's saved inputs)
SCALARS = 16
"""Bytes the measurement holds that the estimate leaves out: the loss's saved scalars (4 to 12 bytes here)."""

# (config kwargs, batch, seq, dtype): three shapes, GQA and MHA, tied and untied, fp32 and bf16.
SHAPES = {
    "gqa-fp32": (
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=256),
        2, 32, torch.float32,
    ),
    "gqa-bf16": (
        dict(hidden_size=96, intermediate_size=256, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=3,
             vocab_size=512),
        1, 48, torch.bfloat16,
    ),
    "mha-tied-bf16": (
        dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=8,
             vocab_size=320, tie_word_embeddings=True),
        3, 40, torch.bfloat16,
    ),
}  # fmt: skip


def add_low_rank(model: LlamaForCausalLM, rank: int, targets: tuple[str, ...], dropout: float) -> None:
    """The library's own LoRA layers on ``targets``, base frozen (what the estimate describes)."""
    inject_adapters(model, LoRAConfig(r=rank, dropout=dropout, target_modules=list(targets)))


def measure(model: nn.Module, ids: torch.Tensor) -> dict[str, int]:
    """Activations: unique storages saved for backward (parameters excluded). Static: tensor bytes after a step."""
    loss, activations = saved_activation_bytes(model, ids)
    loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    optimizer.step()
    weights = sum(p.nbytes for p in model.parameters())
    grads = sum(p.grad.nbytes for p in trainable)
    states = sum(t.nbytes for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t))
    return {"activations": activations, "weights": weights, "gradients": grads, "optimizer": states}


def build(tmp_path_factory: pytest.TempPathFactory, key: str) -> tuple[str, LlamaForCausalLM, torch.Tensor]:
    config_kwargs, batch, seq, dtype = SHAPES[key]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config_kwargs)).to(dtype)
    directory = tmp_path_factory.mktemp(key)
    model.save_pretrained(directory)
    ids = torch.randint(0, config_kwargs["vocab_size"], (batch, seq))
    return str(directory), model, ids


def rel_err(estimate: int, measured: int) -> float:
    return abs(estimate - measured) / measured


ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


@pytest.mark.parametrize("key", list(SHAPES))
@pytest.mark.parametrize(
    ("method", "targets", "dropout"),
    [("full", (), 0.0), ("lora", LINEAR_NAMES, 0.0), ("lora", ATTENTION, 0.1), ("lora", LINEAR_NAMES, 0.1),
     ("lora", ("gate_proj", "up_proj", "down_proj"), 0.1), ("lora", ("o_proj", "down_proj"), 0.1)],
    ids=["full", "lora-all-linear", "lora-attention-dropout", "lora-all-linear-dropout", "lora-mlp-dropout",
         "lora-o-down-dropout"],
)  # fmt: skip
def test_estimate_matches_measured(tmp_path_factory, key, method, targets, dropout):
    directory, model, ids = build(tmp_path_factory, key)
    rank = 4
    if method == "lora":
        add_low_rank(model, rank, targets, dropout)
    measured = measure(model, ids)
    _, batch, seq, dtype = SHAPES[key]
    est = estimate_memory(
        directory,
        method,
        batch=batch,
        seq=seq,
        rank=rank,
        precision="fp32" if dtype == torch.float32 else "bf16",
        target_modules=targets or "all-linear",
        lora_dropout=dropout,
        device="cpu",
    )
    # Every saved storage is in the formula: dropped copies, masks only where the input needs a gradient, ...
    assert 0 <= measured["activations"] - est.activations_bytes <= SCALARS, (est, measured)
    # Static memory is plain arithmetic: it must agree far more tightly (AdamW's scalar step counters aside).
    assert rel_err(est.weights_bytes, measured["weights"]) < 1e-3
    assert rel_err(est.gradients_bytes, measured["gradients"]) < 1e-3
    assert rel_err(est.optimizer_bytes, measured["optimizer"]) < 0.01


def test_checkpointing_keeps_layer_inputs(tmp_path_factory):
    directory, model, ids = build(tmp_path_factory, "gqa-bf16")
    plain = measure(model, ids)["activations"]
    # Reentrant checkpointing saves each layer's inputs through save_for_backward, where the hook sees them.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    else:  # older transformers
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    held = measure(model, ids)["activations"]  # layer inputs + what is saved outside the layers
    _, batch, seq, _ = SHAPES["gqa-bf16"]
    est = estimate_memory(directory, "full", batch=batch, seq=seq, precision="bf16", checkpointing=True)
    est_plain = estimate_memory(directory, "full", batch=batch, seq=seq, precision="bf16")
    info = resolve_model(directory)
    assert est.checkpoint_bytes == info.num_layers * 2 * batch * seq * info.hidden_size
    # During backward one layer is recomputed on top of what is held.
    assert rel_err(est.activations_bytes - est.layer_activation_bytes, held) < TOLERANCE
    assert rel_err(est_plain.activations_bytes, plain) < TOLERANCE
    assert held < plain and est.activations_bytes < est_plain.activations_bytes


def test_7b_full_finetune_static_is_112_gb():
    est = estimate_memory("7B", "full", batch=1, seq=512)
    assert est.weights_bytes + est.gradients_bytes + est.optimizer_bytes == 112_000_000_000
    assert est.static_bytes == 16 * 7_000_000_000
    sgd = estimate_memory("7B", "full", batch=1, seq=512, optimizer="sgd")
    assert sgd.static_bytes == 12 * 7_000_000_000  # one momentum buffer instead of two Adam moments


def test_fsdp_shards_static_memory_not_activations():
    one = estimate_memory("7B", "full", batch=2, seq=1024)
    eight = estimate_memory("7B", "full", batch=2, seq=1024, gpus=8)
    assert eight.static_bytes == one.static_bytes // 8
    assert eight.activations_bytes == one.activations_bytes
    # FSDP holds some parameters whole while it computes (gathered_bytes, tested in tests/strategies); none unsharded
    assert one.gathered_bytes == 0 < eight.gathered_bytes
    assert eight.total_bytes == one.static_bytes // 8 + one.activations_bytes + eight.gathered_bytes


def test_lora_and_qlora_static_bytes():
    info = resolve_model("7B")
    rank = 16
    shapes = info.linear_shapes()
    adapter = info.num_layers * sum(rank * (fan_in + fan_out) for fan_in, fan_out in shapes.values())
    lora = estimate_memory(info, "lora", rank=rank)
    assert lora.trainable_params == adapter
    # bf16 frozen base; fp32 adapters with fp32 gradients and two fp32 AdamW moments.
    assert lora.weights_bytes == 2 * info.n_params + 4 * adapter
    assert lora.gradients_bytes == 4 * adapter
    assert lora.optimizer_bytes == 8 * adapter
    qlora = estimate_memory(info, "qlora", rank=rank)
    assert NF4_BITS_PER_WEIGHT - 4 == pytest.approx(0.127, abs=5e-4)  # double-quantized absmax overhead
    base = info.linear_params * NF4_BITS_PER_WEIGHT / 8 + 2 * (info.n_params - info.linear_params)
    assert qlora.weights_bytes == pytest.approx(base + 4 * adapter, abs=1)
    assert qlora.activations_bytes == lora.activations_bytes
    assert qlora.weights_bytes < 0.4 * lora.weights_bytes


def test_activation_formula_per_layer_closed_form():
    # Full fine-tuning, bf16, no checkpointing: the closed form from the module docstring.
    info = resolve_model("1.1B")
    b, s, e = 4, 2048, 2
    h, i, a, k, d = info.hidden_size, info.intermediate_size, info.num_heads, info.num_kv_heads, info.head_dim
    per_layer = b * s * ((8 + 4 * e) * h + e * (2 * a * d + 2 * k * d) + 4 * e * i) + 8 * b * s + 4 * b * a * s
    est = estimate_memory(info, "full", batch=b, seq=s, precision="bf16")
    assert est.layer_activation_bytes == per_layer
    # RoPE cos/sin, final norm, lm_head input, token ids, fp32 log-softmax and labels.
    head = 2 * e * s * d + (4 + e) * b * s * h + 4 * b * s + e * b * s * h + 8 * b * s + 4 * b * s * info.vocab_size
    assert est.head_activation_bytes == head + 8 * b * s
    assert est.activations_bytes == info.num_layers * per_layer + head + 8 * b * s
    # Linear in batch and in sequence length: no s^2 attention term.
    double_seq = estimate_memory(info, "full", batch=b, seq=2 * s, precision="bf16")
    assert double_seq.activations_bytes == pytest.approx(2 * est.activations_bytes, rel=1e-4)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"method='dora'.*optimizer='lion'"):
        estimate_memory("7B", "dora", optimizer="lion")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch=0"):
        estimate_memory("7B", "full", batch=0)
    with pytest.raises(ValueError, match="attn_proj"):
        resolve_target_modules(["q_proj", "attn_proj"])
    assert math.isclose(len(resolve_target_modules("all-linear")), 7)


@pytest.mark.parametrize("key", ["gqa-fp32", "mha-tied-bf16"])
@pytest.mark.parametrize(
    ("targets", "dropout", "recompute"),
    [(LINEAR_NAMES, 0.0, False), (LINEAR_NAMES, 0.1, False), (LINEAR_NAMES, 0.0, True), (("q_proj", "v_proj"), 0.1, 0)],
    ids=["all-linear", "all-linear-dropout", "all-linear-recompute", "qv-dropout"],
)
def test_estimate_with_fused_kernels_matches_measured(tmp_path_factory, key, targets, dropout, recompute):
    """``fused_kernels=True``: the bytes FusedKernels' functions save (one input per group, seeds instead of masks,
    the fused MLP without act(gate)), against the same measurement."""
    from lightning_zenft.fusion import finalize_shared_inputs, fuse_lora_layers

    directory, model, ids = build(tmp_path_factory, key)
    add_low_rank(model, 4, targets, dropout)
    fuse_lora_layers(model, warn=False, mlp_recompute=recompute)
    with torch.no_grad():
        model(input_ids=ids)  # the groups of layers reading one input form after a forward
    finalize_shared_inputs(model)
    measured = measure(model, ids)
    _, batch, seq, dtype = SHAPES[key]
    kwargs = dict(batch=batch, seq=seq, rank=4, precision="fp32" if dtype == torch.float32 else "bf16",
                  target_modules=list(targets), lora_dropout=dropout, device="cpu")  # fmt: skip
    est = estimate_memory(directory, "lora", fused_kernels=True, mlp_recompute=recompute, **kwargs)
    assert 0 <= measured["activations"] - est.activations_bytes <= SCALARS, (est.activations_bytes, measured)
    eager = estimate_memory(directory, "lora", **kwargs)
    if dropout or targets == LINEAR_NAMES:
        assert est.activations_bytes < eager.activations_bytes  # what the fused functions do not keep


def test_dropout_masks_closed_form():
    """LoRA dropout on every linear layer: the CUDA estimate keeps 1-byte masks, the CPU one masks in the activation
    dtype, and a mask is kept only where the layer's input needs a gradient (not q/k/v of the first layer, whose input
    comes from the frozen embedding)."""
    info = resolve_model("1.1B")
    b, s, e = 2, 512, 2
    h, i, q = info.hidden_size, info.intermediate_size, info.num_heads * info.head_dim
    kwargs = dict(batch=b, seq=s, rank=8, precision="bf16", lora_dropout=0.1)
    cuda = estimate_memory(info, "lora", device="cuda", **kwargs).activations_bytes
    cpu = estimate_memory(info, "lora", device="cpu", **kwargs).activations_bytes
    none = estimate_memory(info, "lora", **{**kwargs, "lora_dropout": 0.0}).activations_bytes
    layers = info.num_layers
    mask_values = b * s * (layers * (q + 2 * h + i) + (layers - 1) * 3 * h)  # o, gate, up, down; q, k, v after layer 0
    assert cpu - cuda == (e - 1) * mask_values
    # Dropout replaces each group's one shared input (q/k/v, gate/up) by one dropped copy per layer, and down's kept
    # input (the product) by its dropped copy; o keeps its dropped copy beside the attention output kept anyway.
    copies = b * s * layers * ((3 * h - h) + (2 * h - h) + q)
    assert cuda - none == e * copies + 1 * mask_values

"""FusedKernels and the module glue: same losses and state_dict as unfused, groups found, fallbacks named."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_zenft.adapters import DoRALinear, LoRALinear
from lightning_zenft.callbacks.kernels import FusedKernels
from lightning_zenft.callbacks.lora import LoRA
from lightning_zenft.fusion import (
    FusedLoRALinear,
    finalize_shared_inputs,
    fuse_glu_mlps,
    fuse_lora_layers,
    shared_input_groups,
    unfuse_lora_layers,
)
from lightning_zenft.fusion.liger import _rms_norm_kind

LLAMA = dict(
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=101,
    max_position_embeddings=64,
)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**LLAMA))


def adapt(model: nn.Module, r: int = 3, dropout: float = 0.0) -> nn.Module:
    """LoRA on every linear layer of the decoder, with B non-zero so the adapter path matters."""
    for p in model.parameters():
        p.requires_grad_(False)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and name != "lm_head":
                layer = LoRALinear(child, r=r, alpha=2 * r, dropout=dropout)
                nn.init.normal_(layer.lora_B.weight, std=0.05)
                setattr(parent, name, layer)
    return model


class TinyLM(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_llama()
        self.losses: list[float] = []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.model(input_ids=batch, labels=batch).loss
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(1)
        batches = [torch.randint(0, LLAMA["vocab_size"], (2, 11), generator=gen) for _ in range(3)]
        return DataLoader(batches, batch_size=None)


def fit(callbacks: list[L.Callback]) -> TinyLM:
    module = TinyLM()
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(module)
    return module


def test_trainer_losses_equal_with_and_without_fused_kernels() -> None:
    plain = fit([LoRA(r=4, alpha=8)])
    kernels = FusedKernels()
    fused = fit([LoRA(r=4, alpha=8), kernels])
    assert len(plain.losses) == 3
    torch.testing.assert_close(torch.tensor(fused.losses), torch.tensor(plain.losses), rtol=0, atol=1e-5)
    assert len(kernels.applied["lora"]) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    assert len(kernels.applied["mlp"]) == 2
    assert sorted(kernels.applied["shared_input"]) == [
        f"model.model.layers.{i}.self_attn.q_proj,model.model.layers.{i}.self_attn.k_proj,"
        f"model.model.layers.{i}.self_attn.v_proj"
        for i in range(2)
    ]
    assert not any(isinstance(m, FusedLoRALinear) for m in fused.modules()), "teardown restores the plain layers"


def test_state_dict_and_outputs_unchanged_by_fusing() -> None:
    model = adapt(tiny_llama())
    ids = torch.randint(0, LLAMA["vocab_size"], (2, 7))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    want = model(input_ids=ids).logits
    report = fuse_lora_layers(model)
    assert len(report.layers) == 14 and len(report.mlps) == 2
    model(input_ids=ids)  # observe which siblings share their input
    assert len(finalize_shared_inputs(model)) == 2
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=0, atol=1e-5)
    assert unfuse_lora_layers(model) == 14
    assert not shared_input_groups(model)
    torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("recompute", [False, True])
def test_fused_mlp_keeps_or_recomputes_the_down_input(recompute: bool) -> None:
    """Kept: exactly one tokens x intermediate tensor per MLP more than recomputed; gradients equal either way."""
    from lightning_zenft.planning import saved_activation_bytes

    ids = torch.randint(0, LLAMA["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(3))
    plain = adapt(tiny_llama())
    loss_plain, _ = saved_activation_bytes(plain, ids)
    loss_plain.backward()
    fused = adapt(tiny_llama())
    fuse_lora_layers(fused, shared_input=False, mlp_recompute=recompute)
    loss, saved = saved_activation_bytes(fused, ids)
    loss.backward()
    torch.testing.assert_close(loss, loss_plain, rtol=0, atol=1e-5)
    grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    for n, p in fused.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6, msg=n)
    other = adapt(tiny_llama())
    fuse_lora_layers(other, shared_input=False, mlp_recompute=not recompute)
    _, saved_other = saved_activation_bytes(other, ids)
    h_bytes = LLAMA["num_hidden_layers"] * ids.numel() * LLAMA["intermediate_size"] * 4  # fp32
    assert (saved_other - saved) == (h_bytes if recompute else -h_bytes)


def test_fallbacks_are_named_in_warnings() -> None:
    model = adapt(tiny_llama())
    mlp = model.model.layers[0].mlp
    mlp.down_proj = mlp.down_proj.base_layer  # this MLP can no longer be fused whole
    attn = model.model.layers[1].self_attn
    attn.q_proj.lora_dropout = nn.AlphaDropout(0.1)  # not a dropout the kernels can regenerate
    attn.k_proj = DoRALinear(attn.k_proj.base_layer, r=2, alpha=4, dropout=0.1)  # fused, dropout and all
    with pytest.warns(UserWarning) as record:
        report = fuse_lora_layers(model)
    text = "\n".join(str(w.message) for w in record)
    assert "model.layers.1.self_attn.q_proj keeps the unfused LoRA forward: its lora_dropout is a AlphaDropout" in text
    assert "model.layers.0.mlp is a gated MLP but is not fused" in text and "down_proj" in text
    assert report.mlps == ["model.layers.1.mlp"]
    assert type(attn.q_proj) is LoRALinear and "model.layers.1.self_attn.k_proj" in report.layers


def test_dora_model_fused_matches_unfused() -> None:
    """DoRA on every projection (no dropout): each layer runs the fused DoRA kernel; loss, every gradient equal."""
    from lightning_zenft.config import LoRAConfig
    from lightning_zenft.fusion import FusedDoRALinear
    from lightning_zenft.inject import inject_adapters

    ids = torch.randint(0, LLAMA["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(4))
    models = []
    for _ in range(2):
        model = tiny_llama()
        inject_adapters(model, LoRAConfig(r=3, alpha=6, use_dora=True, target_modules="all-linear"))
        torch.manual_seed(5)
        for m in model.modules():
            if isinstance(m, DoRALinear):
                nn.init.normal_(m.lora_B.weight, std=0.1)
                with torch.no_grad():
                    m.lora_magnitude_vector.mul_(1.0 + 0.2 * torch.rand_like(m.lora_magnitude_vector))
        models.append(model)
    plain, fused = models
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every DoRA layer is fused on its own: no fallback to warn about
        report = fuse_lora_layers(fused)
    assert len(report.layers) == 14 and not report.mlps
    assert sum(isinstance(m, FusedDoRALinear) for m in fused.modules()) == 14
    fused(input_ids=ids)
    assert finalize_shared_inputs(fused) == []  # DoRA layers are not grouped
    losses = [m(input_ids=ids, labels=ids).loss for m in (plain, fused)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=1e-5)
    grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    assert any("lora_magnitude_vector" in n for n in grads)
    for n, p in fused.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6, msg=n)
    assert unfuse_lora_layers(fused) == 14 and all(type(m) is not FusedDoRALinear for m in fused.modules())


class TwoReaders(nn.Module):
    """Calls its two LoRA layers on one input, then (when asked) on two different inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.a = LoRALinear(nn.Linear(6, 5), r=2, alpha=2)
        self.b = LoRALinear(nn.Linear(6, 4), r=2, alpha=2)
        for layer in (self.a, self.b):
            nn.init.normal_(layer.lora_B.weight)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return torch.cat([self.a(x), self.b(x if y is None else y)], dim=-1)


def test_group_splits_with_a_warning_when_inputs_differ() -> None:
    torch.manual_seed(0)
    module = TwoReaders()
    x, y = torch.randn(3, 6), torch.randn(3, 6)
    want_same, want_diff = module(x), module(x, y)
    fuse_lora_layers(module)
    module(x)
    assert finalize_shared_inputs(module) == [["a", "b"]]
    torch.testing.assert_close(module(x), want_same)
    with pytest.warns(UserWarning, match="b leaves its shared-input group"):
        got = module(x, y)
    torch.testing.assert_close(got, want_diff)
    assert not shared_input_groups(module)


def test_bitsandbytes_nf4_base_matches_unfused() -> None:
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    base = bnb.nn.Linear4bit(33, 65, bias=True, compute_dtype=torch.float32, quant_type="nf4").to("cpu")
    layer = LoRALinear(base, r=3, alpha=6)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 7, 33, requires_grad=True)
    want = layer(x)
    want.sum().backward()
    want_grads = [t.grad.clone() for t in (x, layer.lora_A.weight, layer.lora_B.weight)]
    for t in (x, layer.lora_A.weight, layer.lora_B.weight):
        t.grad = None
    assert fuse_lora_layers(layer).layers == [""]
    got = layer(x)
    got.sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip((x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad), want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_glu_kernel_on_plain_mlps_keeps_outputs() -> None:
    model = tiny_llama()
    ids = torch.randint(0, LLAMA["vocab_size"], (1, 5))
    want = model(input_ids=ids).logits
    assert fuse_glu_mlps(model) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=0, atol=1e-5)


def test_rms_norm_detection_finds_llama_and_gemma_casting() -> None:
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    assert _rms_norm_kind(LlamaRMSNorm(16, eps=1e-6)) == (1e-6, 0.0, "llama")
    gemma = GemmaRMSNorm(16, eps=1e-6)
    nn.init.normal_(gemma.weight)
    assert _rms_norm_kind(gemma) == (1e-6, 1.0, "gemma")
    assert _rms_norm_kind(nn.LayerNorm(16)) is None


def test_liger_switch_errors_are_actionable(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="use True, False or 'auto'"):
        FusedKernels(rope="yes")
    pytest.importorskip("liger_kernel")
    kernels = FusedKernels(rms_norm=True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the interpreter would let Liger run on CPU
    with pytest.raises(ValueError, match="set rms_norm=False"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit([LoRA(r=2), kernels])


LIGER_SCRIPT = textwrap.dedent(
    """
    import json, os
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from lightning_zenft.adapters import LoRALinear
    from lightning_zenft.fusion import apply_liger, restore_liger
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**json.loads(os.environ["LLAMA"]) | {"num_hidden_layers": 1}))
    for p in model.parameters():
        p.requires_grad_(False)
    model.lm_head = LoRALinear(model.lm_head, r=3, alpha=6)
    attn = model.model.layers[0].self_attn
    attn.q_proj = LoRALinear(attn.q_proj, r=3, alpha=6)
    for layer in (model.lm_head, attn.q_proj):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    def run():
        for p in model.parameters():
            p.grad = None
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        return out.loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    want_loss, want = run()
    patches = apply_liger(model, rms_norm=False, rope=True, fused_linear_cross_entropy=True)
    got_loss, got = run()
    names = [w for _, w in patches.forwards] + [f"{m.__name__}.{n}" for m, n, _ in patches.functions]
    restore_liger(patches)
    errs = {n: (got[n] - want[n]).abs().max().item() / want[n].abs().max().item() for n in want}
    print(json.dumps({"patched": names, "loss": [want_loss, got_loss], "rel_grad_err": errs}))
    """
)


def test_liger_fused_cross_entropy_keeps_the_lora_head_gradient() -> None:
    """Liger's fused linear cross-entropy and RoPE, run by Triton's interpreter in a fresh process (it must be on
    before Triton is first imported); the LoRA on the output head must get the same gradient as unfused."""
    pytest.importorskip("liger_kernel")
    env = {**os.environ, "TRITON_INTERPRET": "1", "LLAMA": json.dumps(LLAMA)}
    proc = subprocess.run([sys.executable, "-c", LIGER_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["patched"] == [
        "fused_linear_cross_entropy:",
        "transformers.models.llama.modeling_llama.apply_rotary_pos_emb",
    ]
    assert abs(result["loss"][0] - result["loss"][1]) < 1e-5
    assert set(result["rel_grad_err"]) == {
        "model.layers.0.self_attn.q_proj.lora_A.weight",
        "model.layers.0.self_attn.q_proj.lora_B.weight",
        "lm_head.lora_A.weight",
        "lm_head.lora_B.weight",
    }
    assert max(result["rel_grad_err"].values()) < 1e-4, result


def test_gpt2_conv1d_base_matches_unfused() -> None:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = LoRALinear(Conv1D(65, 33), r=3, alpha=6)  # Conv1D stores its weight as (in, out)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 7, 33, requires_grad=True)
    want = layer(x)
    want.backward(torch.ones_like(want))
    want_grads = [t.grad.clone() for t in (x, layer.lora_A.weight, layer.lora_B.weight)]
    for t in (x, layer.lora_A.weight, layer.lora_B.weight):
        t.grad = None
    fuse_lora_layers(layer)
    got = layer(x)
    got.backward(torch.ones_like(got))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip((x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad), want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert layer.base_layer.weight.grad is None


def test_fused_kernels_without_an_adapter_callback_warns() -> None:
    """Alone in the Trainer, FusedKernels would silently run a full fine-tune with fused MLPs: it says so."""
    with pytest.warns(UserWarning, match="holds no adapter layer, so no fused LoRA kernel runs and every weight"):
        module = fit([FusedKernels(rms_norm=False, rope=False, fused_linear_cross_entropy=False)])
    assert len(module.losses) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        fit([LoRA(r=2), FusedKernels(rms_norm=False, rope=False, fused_linear_cross_entropy=False)])

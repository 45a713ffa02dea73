"""Whole models with fused LoRA kernels against the same models without them, in edge-case combinations.

Complements ``test_fused_kernels_callback.py`` (one Llama, dropout 0) and the kernel-level tests: every architecture
of the test helpers, per-layer dropout configurations whose masks are pinned so fused and unfused models draw the same
ones, gradient checkpointing (reentrant and not), autocast, merged/disabled adapters and no-grad modes, frozen factors,
siblings that do not share their input, unfuse, and Trainer runs; and regression tests for the bugs they found.
"""

from __future__ import annotations

import copy
import functools
import io
import warnings
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zenft_testing import TinyLM, make_trainer, tiny_model, token_batch

import lightning_zenft.kernels.lora as kernels_lora
from lightning_zenft import LoRA, LoRAConfig, disable_adapters, inject_adapters, merge_adapters, unmerge_adapters
from lightning_zenft.adapters import LoRALinear
from lightning_zenft.callbacks.kernels import FusedKernels
from lightning_zenft.fusion import (
    FusedLoRALinear,
    finalize_shared_inputs,
    fuse_glu_mlps,
    fuse_lora_layers,
    shared_input_groups,
    unfuse_lora_layers,
)
from lightning_zenft.kernels.lora import ProjectionPlan, dropout_mask

ARCHS = ["llama", "qwen2", "mistral", "gemma", "phi", "gpt2"]
GATED = {"llama", "qwen2", "mistral", "gemma"}  # gate/up/down MLPs the fused MLP kernel takes
QKV = {"llama", "qwen2", "mistral", "gemma", "phi"}  # separate q/k/v projections on one input


# ------------------------------------------------------------------------------------------------------------ helpers
def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def adapted(arch: str = "llama", seed: int = 0, **config: object) -> nn.Module:
    """A tiny model with LoRA on every linear layer and a non-zero B, so the adapter path changes the outputs."""
    model = tiny_model(arch, seed)
    inject_adapters(model, LoRAConfig(**{"r": 4, "alpha": 8.0, **config}))
    gen = torch.Generator().manual_seed(seed + 5)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.1)
    return model


def fused_copy(model: nn.Module, ids: torch.Tensor, **kwargs: bool) -> tuple[nn.Module, object]:
    """A deep copy of the (unfused) ``model``, fused, with shared-input groups formed after one forward."""
    fused = copy.deepcopy(model)
    report = fuse_lora_layers(fused, **kwargs)
    with torch.no_grad():
        fused(input_ids=ids)
    finalize_shared_inputs(fused)
    return fused, report


def loss_and_grads(model: nn.Module, ids: torch.Tensor, seed: int = 7) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward and backward from a fixed RNG state (the models' own dropouts then draw the same masks)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def assert_same_grads(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert sorted(got) == sorted(want), "different parameters received a gradient"
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def no_model_dropout(model: nn.Module) -> nn.Module:
    """Turn off the model's own dropouts (GPT-2 has several), leaving the adapters' alone."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Dropout) and not name.endswith("lora_dropout"):
            module.p = 0.0
    return model


class PinnedDropout(nn.Module):
    """The unfused reference of a fused layer's dropout: the kernels' own mask for a fixed seed."""

    def __init__(self, p: float, seed: int) -> None:
        super().__init__()
        self.p, self.seed = p, seed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        rows = torch.Size((x.numel() // x.shape[-1], x.shape[-1]))  # the kernels draw on the (M, K) input
        return x * dropout_mask(rows, self.p, self.seed, x.device, x.dtype).view_as(x)


@pytest.fixture
def pin_seeds(monkeypatch: pytest.MonkeyPatch) -> Callable[[nn.Module, nn.Module], None]:
    """Give each fused layer a fixed dropout seed and its unfused twin a :class:`PinnedDropout` with that seed.

    The fused kernels then draw exactly the masks the reference draws (forward, backward, checkpoint recompute) and
    consume no global RNG for seeds, so the models' own dropouts stay in step too.
    """
    seeds: dict[int, int] = {}
    init = ProjectionPlan.__init__

    def pinned_init(self: ProjectionPlan, projections: list, training: bool, runtime: object = None) -> None:
        init(self, projections, training, runtime)
        self.seeds = [
            None if d == 0 else seeds.get(id(p.lora_a), 0) for p, d in zip(projections, self.dropouts, strict=True)
        ]

    monkeypatch.setattr(kernels_lora, "_new_seed", lambda: 0)
    monkeypatch.setattr(ProjectionPlan, "__init__", pinned_init)

    def pin(fused: nn.Module, reference: nn.Module) -> None:
        pairs = zip(lora_layers(fused), lora_layers(reference), strict=True)
        for i, ((name, f), (name_r, r)) in enumerate(pairs):
            assert name == name_r
            seeds[id(f.lora_A.weight)] = 1000 + i
            if isinstance(r.lora_dropout, nn.Dropout):
                r.lora_dropout = PinnedDropout(r.lora_dropout.p, 1000 + i)

    return pin


def set_dropouts(model: nn.Module, ps: list[float]) -> None:
    """Per-layer adapter dropout, cycling through ``ps`` (0 means no dropout module at all)."""
    for i, (_, layer) in enumerate(lora_layers(model)):
        p = ps[i % len(ps)]
        layer.lora_dropout = nn.Dropout(p) if p > 0 else nn.Identity()


@pytest.fixture
def fused_warnings() -> Iterator[Callable[[], list[str]]]:
    """Records every warning of the test; call the fixture's value for the fused-LoRA ones (fallbacks, splits)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield lambda: [str(w.message) for w in caught if "fused LoRA" in str(w.message)]


# ------------------------------------------------------------------------------------------------ per architecture
@pytest.mark.parametrize("arch", ARCHS)
def test_each_architecture_fuses_every_layer_and_matches_unfused(arch: str) -> None:
    """All-linear LoRA with per-layer ranks/alphas, rsLoRA and trainable biases: same loss and every gradient."""
    config = dict(rank_pattern={"k_proj|c_fc": 2, "v_proj": 6}, alpha_pattern={"o_proj|dense": 3.0}, use_rslora=True)
    model = no_model_dropout(adapted(arch, bias="lora_only", **config)).train()
    ids = token_batch(2, 12)
    fused, report = fused_copy(model, ids)

    names = [n for n, _ in lora_layers(model)]
    assert report.layers == names and not report.skipped, "a layer fell back silently"
    assert all(type(layer) is FusedLoRALinear for _, layer in lora_layers(fused))
    assert len(report.mlps) == (2 if arch in GATED else 0)
    groups = shared_input_groups(fused)
    if arch in QKV:
        assert sorted(tuple(n.rsplit(".", 1)[-1] for n in g) for g in groups) == [("q_proj", "k_proj", "v_proj")] * 2
    else:
        assert groups == []  # GPT-2: c_attn and attn.c_proj have one in_features but never one input

    want_loss, want = loss_and_grads(model, ids)
    got_loss, got = loss_and_grads(fused, ids)
    assert any(n.endswith("bias") for n in want) or arch in {"llama", "mistral", "gemma"}
    torch.testing.assert_close(got_loss, want_loss, rtol=0, atol=2e-6)
    assert_same_grads(got, want)
    assert all(p.grad is None for n, p in fused.named_parameters() if n.endswith("weight") and "lora_" not in n)


# ---------------------------------------------------------------------------------------------------- dropout
# Layer 0 mixes dropped and undropped members in the q/k/v group and in the MLP; layer 1 drops on every layer (no
# member shares the low-rank GEMMs).
MIXED_PS = [0.3, 0.0, 0.5, 0.2, 0.4, 0.0, 0.25]


@pytest.mark.parametrize("arch", ["llama", "gemma", "gpt2"])
def test_per_layer_dropout_matches_unfused_with_the_same_masks(
    arch: str, pin_seeds: Callable[[nn.Module, nn.Module], None]
) -> None:
    """Torch path only: the Triton kernels' dropout configurations are covered at kernel level (whole models through
    Triton's interpreter take too long here)."""
    model = no_model_dropout(adapted(arch)).train()
    layers = lora_layers(model)
    set_dropouts(model, MIXED_PS)
    for name, layer in layers:
        if ".1." in name:
            layer.lora_dropout = nn.Dropout(0.35)
    ids = token_batch(2, 12)
    fused, report = fused_copy(model, ids)
    pin_seeds(fused, model)
    assert len(report.layers) == len(layers)

    want_loss, want = loss_and_grads(model, ids)
    got_loss, got = loss_and_grads(fused, ids)
    torch.testing.assert_close(got_loss, want_loss, rtol=0, atol=2e-6)
    assert_same_grads(got, want)
    # eval: no dropout anywhere, fused or not
    model.eval(), fused.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=2e-6)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gradient_checkpointing_recomputes_the_same_masks(
    arch: str,
    reentrant: bool,
    pin_seeds: Callable[[nn.Module, nn.Module], None],
    fused_warnings: Callable[[], list[str]],
) -> None:
    """Checkpointed fused model (groups, fused MLP, dropout) against the unfused model without checkpointing."""
    model = no_model_dropout(adapted(arch)).train()
    set_dropouts(model, MIXED_PS)
    ids = token_batch(2, 12)
    fused, _ = fused_copy(model, ids)
    pin_seeds(fused, model)
    groups = shared_input_groups(fused)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers renames the method
        fused.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    fused.train()
    calls = []
    mlp = fused.model.layers[0].mlp if arch != "gpt2" else fused.transformer.h[0].mlp
    mlp.register_forward_pre_hook(lambda *_: calls.append(1))

    want_loss, want = loss_and_grads(model, ids)
    for _ in range(2):  # the second step runs on groups that went through a recompute
        got_loss, got = loss_and_grads(fused, ids)
        torch.testing.assert_close(got_loss, want_loss, rtol=0, atol=2e-6)
        assert_same_grads(got, want)
    assert len(calls) == 4, "the MLP was not recomputed in backward: checkpointing is off"
    assert shared_input_groups(fused) == groups
    assert not fused_warnings(), fused_warnings()


def test_fused_model_with_checkpointing_and_dropout_in_trainer(tmp_path: object) -> None:
    """Same seed, LoRA dropout: FusedKernels with and without HF gradient checkpointing train identically."""

    def fit(checkpointing: bool) -> tuple[list[float], FusedKernels]:
        module = TinyLM("llama", seed=0)
        if checkpointing:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                module.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        kernels = FusedKernels()
        torch.manual_seed(0)
        make_trainer(tmp_path, [LoRA(r=4, dropout=0.3), kernels], max_steps=4).fit(module)
        return module.losses, kernels

    plain_losses, plain = fit(False)
    ckpt_losses, ckpt = fit(True)
    assert len(plain_losses) == 4 and len(plain.applied["shared_input"]) == 2
    assert ckpt.applied == plain.applied
    assert ckpt_losses == plain_losses


# ---------------------------------------------------------------------------------------------------- precision
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_autocast_bf16_over_fp32_model_matches_unfused(arch: str) -> None:
    model = no_model_dropout(adapted(arch)).train()
    ids = token_batch(2, 12)
    fused, _ = fused_copy(model, ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want_loss, want = loss_and_grads(model, ids)
        got_loss, got = loss_and_grads(fused, ids)
    torch.testing.assert_close(got_loss, want_loss, rtol=0, atol=3e-3)
    assert all(g.dtype == torch.float32 for g in got.values())
    scale = max(g.abs().max().item() for g in want.values())
    assert sorted(got) == sorted(want)
    for name, g in want.items():
        err = (got[name] - g).abs().max().item()
        assert err <= 3e-2 * scale, f"{name}: {err:.3g} > {3e-2 * scale:.3g}"


def test_trainer_bf16_mixed_with_trainable_biases_matches_unfused(tmp_path: object) -> None:
    """Qwen2 (q/k/v biases, trained): Lightning's bf16 autocast, losses step by step close to the unfused run."""

    def fit(callbacks: list) -> list[float]:
        module = TinyLM("qwen2", seed=0)
        torch.manual_seed(0)
        make_trainer(tmp_path, callbacks, max_steps=4, precision="bf16-mixed").fit(module)
        return module.losses

    kernels = FusedKernels()
    fused = fit([LoRA(r=4, bias="lora_only"), kernels])
    plain = fit([LoRA(r=4, bias="lora_only")])
    assert len(kernels.applied["lora"]) == 14 and len(kernels.applied["mlp"]) == 2
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(plain), rtol=0, atol=2e-3)


# ---------------------------------------------------------------------------------------------- adapter states, modes
def test_merged_disabled_eval_no_grad_and_inference_mode_match_unfused() -> None:
    model = adapted("llama").eval()
    ids = token_batch(2, 10)
    fused, _ = fused_copy(model, ids)
    attn, fattn = model.model.layers[0].self_attn, fused.model.layers[0].self_attn

    def both() -> tuple[torch.Tensor, torch.Tensor]:
        return model(input_ids=ids).logits, fused(input_ids=ids).logits

    with torch.no_grad():
        want, got = both()
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
    with torch.inference_mode():
        torch.testing.assert_close(fused(input_ids=ids).logits, want, rtol=0, atol=2e-6)
    with disable_adapters(model), disable_adapters(fused), torch.no_grad():
        base, fbase = both()
    torch.testing.assert_close(fbase, base, rtol=0, atol=2e-6)
    assert (base - want).abs().max() > 1e-2, "the adapters must matter for this test to mean anything"
    # one member of a group merged, one disabled: the others still run fused
    for a in (attn, fattn):
        a.k_proj.merge()
        a.v_proj.disabled = True
    with torch.no_grad():
        partial, fpartial = both()
    torch.testing.assert_close(fpartial, partial, rtol=0, atol=2e-6)
    for a in (attn, fattn):
        a.k_proj.unmerge()
        a.v_proj.disabled = False
    merge_adapters(model), merge_adapters(fused)
    with torch.no_grad():
        merged, fmerged = both()
    torch.testing.assert_close(fmerged, merged, rtol=0, atol=2e-6)
    torch.testing.assert_close(fmerged, want, rtol=0, atol=1e-5)
    unmerge_adapters(model), unmerge_adapters(fused)
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=ids).logits, want, rtol=0, atol=1e-5)
    assert all(type(layer) is FusedLoRALinear for _, layer in lora_layers(fused))


def test_frozen_factors_and_requires_grad_toggled_after_fusing() -> None:
    """Frozen A everywhere, frozen B on some members of a group and of the MLP; then toggled back after fusing."""
    model = adapted("llama").train()
    ids = token_batch(2, 10)
    fused, _ = fused_copy(model, ids)

    def toggle(m: nn.Module, trainable: bool) -> None:
        for name, p in m.named_parameters():
            if "lora_A" in name or ("lora_B" in name and any(k in name for k in ("k_proj", "up_proj", "o_proj"))):
                p.requires_grad_(trainable)

    for trainable in (False, True, False):
        toggle(model, trainable), toggle(fused, trainable)
        want_loss, want = loss_and_grads(model, ids)
        got_loss, got = loss_and_grads(fused, ids)
        torch.testing.assert_close(got_loss, want_loss, rtol=0, atol=2e-6)
        assert_same_grads(got, want)
        assert any("lora_A" in n for n in got) == trainable


def test_attention_only_lora_with_the_glu_kernel_on_the_plain_mlps() -> None:
    """LoRA on attention only: the frozen MLPs run the GLU kernel, whose backward carries the adapters' gradients."""
    model = adapted("gemma", target_modules="attention").train()
    ids = token_batch(2, 10)
    fused, report = fused_copy(model, ids)
    assert report.mlps == [] and fuse_glu_mlps(fused) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    want_loss, want = loss_and_grads(model, ids)
    got_loss, got = loss_and_grads(fused, ids)
    torch.testing.assert_close(got_loss, want_loss, rtol=0, atol=2e-6)
    assert_same_grads(got, want)


# ------------------------------------------------------------------------------------------------ shared-input groups
class SplitNormAttention(nn.Module):
    """q and v read ``x``; k reads its own norm of ``x``; o (same in_features as q/k/v) reads the mix."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(dim, dim) for _ in range(4))
        self.k_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q_proj(x), self.k_proj(self.k_norm(x)), self.v_proj(x)
        att = torch.softmax(q @ k.transpose(-1, -2) / 4, dim=-1)
        return self.o_proj(att @ v)


class TwoBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(SplitNormAttention() for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return x


def test_siblings_that_do_not_share_their_input_are_not_grouped(fused_warnings: Callable[[], list[str]]) -> None:
    torch.manual_seed(0)
    model = TwoBlocks()
    inject_adapters(model, LoRAConfig(r=3, alpha=6.0, target_modules=r".*_proj"))
    for _, layer in lora_layers(model):
        nn.init.normal_(layer.lora_B.weight, std=0.2)
    fused = copy.deepcopy(model)
    report = fuse_lora_layers(fused)
    x = torch.randn(2, 5, 16)
    fused(x)
    assert report.observed_parents == ["blocks.0", "blocks.1"]
    assert finalize_shared_inputs(fused) == [[f"blocks.{i}.q_proj", f"blocks.{i}.v_proj"] for i in range(2)]

    for _ in range(2):  # the second call runs on the formed groups again
        xs = [x.clone().requires_grad_(True), x.clone().requires_grad_(True)]
        outs = [m(xi) for m, xi in zip((model, fused), xs, strict=True)]
        dy = torch.randn_like(outs[0])
        for m, out in zip((model, fused), outs, strict=True):
            m.zero_grad(set_to_none=True)
            out.backward(dy)
        torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=2e-6)
        torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-5, atol=2e-6)
        want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert_same_grads({n: p.grad for n, p in fused.named_parameters() if p.grad is not None}, want)
    assert len(shared_input_groups(fused)) == 2, "a group split at run time"
    assert not fused_warnings(), fused_warnings()


# ---------------------------------------------------------------------------------------------------- unfuse
def test_unfuse_restores_classes_forwards_and_state_dict_and_fuses_again() -> None:
    model = adapted("llama", dropout=0.1).eval()
    ids = token_batch(2, 10)
    keys = list(model.state_dict())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        want = model(input_ids=ids).logits
    for _ in range(2):  # fuse, unfuse, and the same again (a second Trainer.fit on one module)
        report = fuse_lora_layers(model)
        with torch.no_grad():
            model(input_ids=ids)
        assert len(finalize_shared_inputs(model)) == 2 and len(report.mlps) == 2
        assert list(model.state_dict()) == keys
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        assert unfuse_lora_layers(model) == 14
        assert all(type(layer) is LoRALinear for _, layer in lora_layers(model))
        assert not any("_zenft_group" in m.__dict__ or "forward" in m.__dict__ for m in model.modules())
        assert list(model.state_dict()) == keys
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- in-place on outputs
def tiny_falcon() -> nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    config = tf.FalconConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    assert config.parallel_attn and not config.new_decoder_architecture  # falcon-7b's layout
    return tf.FalconForCausalLM(config).float()


def test_falcon_parallel_attention_trains_fused() -> None:
    """Falcon adds attention into the MLP's output in place (``mlp_output += attention_output``): the fused layers'
    outputs must allow it (they were views made inside the autograd function, on which autograd forbids it)."""
    model = tiny_falcon()
    inject_adapters(model, LoRAConfig(r=4, alpha=8.0))
    for _, layer in lora_layers(model):
        nn.init.normal_(layer.lora_B.weight, std=0.1)
    model.train()
    ids = token_batch(2, 12)
    want_loss, want = loss_and_grads(model, ids)
    report = fuse_lora_layers(model)
    assert len(report.layers) == 8 and not report.skipped
    got_loss, got = loss_and_grads(model, ids)
    torch.testing.assert_close(got_loss, want_loss, rtol=0, atol=2e-6)
    assert_same_grads(got, want)


# ----------------------------------------------------------------------- regressions: bugs these tests found, now fixed
@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
@pytest.mark.parametrize("kernel", ["lora_mlp", "glu"])
def test_copy_of_a_fused_model_is_independent(how: str, kernel: str) -> None:
    model = adapted("llama", target_modules="all-linear" if kernel == "lora_mlp" else "attention").eval()
    ids = token_batch(2, 10)
    fused, report = fused_copy(model, ids)
    applied = report.mlps if kernel == "lora_mlp" else fuse_glu_mlps(fused)
    assert len(applied) == 2
    if how == "deepcopy":
        clone = copy.deepcopy(fused)
    else:
        buffer = io.BytesIO()
        torch.save(fused, buffer)
        buffer.seek(0)
        clone = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        want = clone(input_ids=ids).logits
        for p in fused.model.layers[0].mlp.parameters():
            p.mul_(3)  # the original changes; the copy must not
        torch.testing.assert_close(clone(input_ids=ids).logits, want, rtol=0, atol=0)


class GatedMLPWithDropout(nn.Module):
    """``down(dropout(act(gate(x)) * up(x)))``, T5's gated feed-forward: the dropout runs in training only."""

    def __init__(self, act_module: bool) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(16, 40, bias=False), nn.Linear(16, 40, bias=False)
        self.down_proj = nn.Linear(40, 16, bias=False)
        self.act_fn: Callable[[torch.Tensor], torch.Tensor] = nn.SiLU() if act_module else F.silu
        self.dropout = nn.Dropout(0.4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.dropout(self.act_fn(self.gate_proj(x)) * self.up_proj(x)))


@pytest.mark.parametrize("kernel", ["lora_mlp", "glu"])
def test_gated_mlp_keeps_its_training_only_dropout(kernel: str) -> None:
    torch.manual_seed(0)
    mlp = GatedMLPWithDropout(act_module=kernel == "lora_mlp")  # F.silu: 4 children, as fuse_glu_mlps requires
    if kernel == "lora_mlp":
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(mlp, name, LoRALinear(getattr(mlp, name), r=2, alpha=4.0))
    mlp.train()
    x = torch.randn(3, 5, 16)
    torch.manual_seed(1)
    want = mlp(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kernel == "lora_mlp":
            fuse_lora_layers(mlp)
        else:
            fuse_glu_mlps(mlp)
    torch.manual_seed(1)
    torch.testing.assert_close(mlp(x), want, rtol=0, atol=2e-6)


class StopGradKey(nn.Module):
    """q and k read one input; one of them runs under ``torch.no_grad`` (a stop-gradient target)."""

    def __init__(self, no_grad_first: bool) -> None:
        super().__init__()
        self.no_grad_first = no_grad_first
        self.q = LoRALinear(nn.Linear(8, 6), r=2, alpha=4.0)
        self.k = LoRALinear(nn.Linear(8, 6), r=2, alpha=4.0)
        for layer in (self.q, self.k):
            nn.init.normal_(layer.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.no_grad_first:
            with torch.no_grad():
                target = self.q(x)
            pred = self.k(x)
        else:
            pred = self.q(x)
            with torch.no_grad():
                target = self.k(x)
        return ((pred - target) ** 2).sum()


@pytest.mark.parametrize("no_grad_first", [False, True], ids=["no_grad_second", "no_grad_first"])
def test_shared_input_group_respects_grad_mode(no_grad_first: bool) -> None:
    torch.manual_seed(0)
    model = StopGradKey(no_grad_first)
    fused = copy.deepcopy(model)
    fuse_lora_layers(fused)
    x = torch.randn(4, 8)
    fused(x)
    assert finalize_shared_inputs(fused) == [["q", "k"]]
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    for m, xi in zip((model, fused), xs, strict=True):
        m(xi).backward()
    torch.testing.assert_close(xs[1].grad, xs[0].grad)
    for (name, p), (_, pf) in zip(model.named_parameters(), fused.named_parameters(), strict=True):
        want = torch.zeros_like(p) if p.grad is None else p.grad  # a zero gradient stands for none
        assert pf.grad is not None or p.grad is None, f"{name}: gradient lost"
        torch.testing.assert_close(torch.zeros_like(p) if pf.grad is None else pf.grad, want, msg=name)


def test_instance_level_forward_of_an_mlp_is_kept_and_restored() -> None:
    model = adapted("llama").eval()
    ids = token_batch(2, 10)
    mlp = model.model.layers[0].mlp

    def halved(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return type(module).forward(module, x) * 0.5

    wrapper = functools.partial(halved, mlp)
    mlp.forward = wrapper
    with torch.no_grad():
        want = model(input_ids=ids).logits
        fuse_lora_layers(model)
        got = model(input_ids=ids).logits
        unfuse_lora_layers(model)
        after = model(input_ids=ids).logits
    assert mlp.__dict__.get("forward") is wrapper, "unfuse did not restore the instance's forward"
    torch.testing.assert_close(after, want, rtol=0, atol=0)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)


class FailingLM(TinyLM):
    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        if batch_idx == 1:
            raise RuntimeError("step failed")
        return super().training_step(batch, batch_idx)


def test_fit_that_raises_leaves_the_model_unfused(tmp_path: object) -> None:
    module = FailingLM("llama", seed=0)
    with pytest.raises(RuntimeError, match="step failed"):
        make_trainer(tmp_path, [LoRA(r=4), FusedKernels()], max_steps=4).fit(module)
    assert not any(isinstance(m, FusedLoRALinear) for m in module.modules())
    assert not any("forward" in m.__dict__ for m in module.modules())


def test_dora_with_dropout_fused_matches_unfused_with_the_same_masks(
    pin_seeds: Callable[[nn.Module, nn.Module], None],
) -> None:
    """DoRA on every projection with dropout: each layer runs the fused DoRA function (a second base product for the
    dropped-out part), with the unfused DoRALinear's loss and every gradient, magnitude included."""
    from lightning_zenft.adapters import DoRALinear
    from lightning_zenft.fusion import FusedDoRALinear

    model = no_model_dropout(adapted("llama", use_dora=True, dropout=0.2)).train()
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_magnitude_vector.mul_(1.0 + 0.3 * torch.rand_like(layer.lora_magnitude_vector))
    assert all(isinstance(layer, DoRALinear) for _, layer in lora_layers(model))
    ids = token_batch(2, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every DoRA layer is fused on its own: no fallback to warn about
        fused, report = fused_copy(model, ids)
    pin_seeds(fused, model)
    assert len(report.layers) == len(lora_layers(model))
    assert all(isinstance(layer, FusedDoRALinear) for _, layer in lora_layers(fused))
    want_loss, want = loss_and_grads(model, ids)
    got_loss, got = loss_and_grads(fused, ids)
    torch.testing.assert_close(got_loss, want_loss, rtol=0, atol=2e-6)
    assert_same_grads(got, want)
    assert any("lora_magnitude_vector" in name for name in got)

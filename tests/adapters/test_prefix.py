"""Prefix tuning: attention over [Pk; K], [Pv; V] at every layer (a hand-written GPT-2 as the reference), padding,
the cache, generate, and the models where it is impossible."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from prompt_testing import NoCacheLM, NoEmbeddings, generate, greedy_no_cache, padded, randomize, rows
from torch import nn
from zenft_testing import tiny_model, token_batch

from lightning_zenft import (
    PrefixKV,
    PrefixTuningConfig,
    disable_adapters,
    find_adapters,
    inject_adapters,
    load_adapter,
    save_adapter,
    unload_adapters,
)
from lightning_zenft.config import AdapterConfig
from lightning_zenft.registry import _METHODS, Method

N = 3


def _adapted(arch: str, projection: bool = False):
    model = tiny_model(arch)
    config = PrefixTuningConfig(num_virtual_tokens=N, prefix_projection=projection)
    if projection:
        config = PrefixTuningConfig(num_virtual_tokens=N, prefix_projection=True, encoder_hidden_size=24)
    inject_adapters(model, config)
    randomize(model, seed=2)
    ((_, module),) = find_adapters(model)
    return model, module


def _gpt2_with_prefix(model, ids, mask, table):
    """GPT-2 written from its equations, each layer attending over the prefix keys/values first.

    ``table`` is ``P`` ``(n, L * 2 * H * D)`` laid out ``(layer, key|value, head, dim)``; real tokens sit at
    positions ``n + cumsum(mask) - 1``; every query sees the whole prefix and the real tokens up to itself.
    """
    cfg = model.config
    t = model.transformer
    B, T = ids.shape
    H, D = cfg.n_head, cfg.n_embd // cfg.n_head
    prefix = table.view(N, cfg.n_layer, 2, H, D)
    positions = N + (mask.cumsum(-1) - 1).clamp(0)
    x = t.wte(ids) + t.wpe(positions)  # (B, T, C)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    allowed = torch.cat([torch.ones(B, T, N, dtype=torch.bool), causal & mask.bool()[:, None, :]], dim=-1)  # (B,T,N+T)

    def gelu_new(z):
        return 0.5 * z * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))

    for layer, block in enumerate(t.h):
        h = F.layer_norm(x, (cfg.n_embd,), block.ln_1.weight, block.ln_1.bias, cfg.layer_norm_epsilon)
        q, k, v = (h @ block.attn.c_attn.weight + block.attn.c_attn.bias).split(cfg.n_embd, dim=-1)
        q, k, v = (z.view(B, T, H, D).transpose(1, 2) for z in (q, k, v))  # (B, H, T, D)
        k = torch.cat([prefix[:, layer, 0].transpose(0, 1).expand(B, H, N, D), k], dim=2)  # (B, H, N+T, D)
        v = torch.cat([prefix[:, layer, 1].transpose(0, 1).expand(B, H, N, D), v], dim=2)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(D)  # (B, H, T, N+T)
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        a = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, cfg.n_embd)
        x = x + a @ block.attn.c_proj.weight + block.attn.c_proj.bias
        h = F.layer_norm(x, (cfg.n_embd,), block.ln_2.weight, block.ln_2.bias, cfg.layer_norm_epsilon)
        h = gelu_new(h @ block.mlp.c_fc.weight + block.mlp.c_fc.bias)
        x = x + h @ block.mlp.c_proj.weight + block.mlp.c_proj.bias
    x = F.layer_norm(x, (cfg.n_embd,), t.ln_f.weight, t.ln_f.bias, cfg.layer_norm_epsilon)
    return x @ model.lm_head.weight.T  # (B, T, V)


@pytest.mark.parametrize("projection", [False, True])
def test_forward_and_gradients_match_attention_over_the_prefix(projection):
    model, module = _adapted("gpt2", projection)
    model.eval()
    ids = token_batch(2, 7)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in row 1
    logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V): no virtual positions in the outputs
    real = mask.bool()
    (logits[real].logsumexp(-1).sum()).backward()

    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in module.named_parameters()}
    if projection:  # P = W2 tanh(W1 P' + b1) + b2
        hidden = torch.tanh(F.linear(leaves["embedding"], leaves["transform.0.weight"], leaves["transform.0.bias"]))
        table = F.linear(hidden, leaves["transform.2.weight"], leaves["transform.2.bias"])
    else:
        table = leaves["prompt_embeddings"]
    want = _gpt2_with_prefix(model, ids, mask, table)
    want[real].logsumexp(-1).sum().backward()

    assert logits.shape == (2, 7, 128)
    torch.testing.assert_close(logits[real], want[real], atol=1e-5, rtol=1e-5)
    assert {n for n, p in model.named_parameters() if p.grad is not None} == {
        f"prefix_tuning.{n}" for n in module.adapter_params()
    }
    for name, param in module.named_parameters():
        torch.testing.assert_close(param.grad, leaves[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_grouped_query_attention_gets_key_value_heads():
    model, module = _adapted("llama")  # 4 query heads, 2 key/value heads of 8 dims, 2 layers
    assert (module.num_layers, module.num_key_value_heads, module.head_dim) == (2, 2, 8)
    assert module.prompt_embeddings.shape == (N, 2 * 2 * 2 * 8)
    kv = module.key_values()
    assert kv.shape == (2, 2, 2, N, 8)
    # layout (layer, key|value, head, dim) per virtual token, e.g. layer 1's values of head 0 at virtual token 2:
    torch.testing.assert_close(kv[1, 1, 0, 2], module.prompt_embeddings[2].view(2, 2, 2, 8)[1, 1, 0])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize(("side", "given_positions"), [("left", False), ("right", False), ("left", True)])
def test_padded_batches_equal_unpadded_rows(arch, side, given_positions):
    model, _ = _adapted(arch)
    model.eval()
    seqs = rows()
    ids, mask = padded(seqs, side)
    kwargs = {"position_ids": (mask.cumsum(-1) - 1).clamp(0)} if given_positions else {}
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask, **kwargs).logits
        for i, seq in enumerate(seqs):
            alone = model(input_ids=seq[None]).logits[0]
            width, length = ids.shape[1], len(seq)
            real = slice(width - length, width) if side == "left" else slice(0, length)
            torch.testing.assert_close(batch[i, real], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_equals_no_cache_greedy_and_unpadded_rows(arch):
    model, _ = _adapted(arch, projection=arch == "llama")
    model.eval()
    seqs = rows(lengths=(5, 3))
    ids, mask = padded(seqs, "left")
    batch = generate(model, ids, mask, 6)[:, ids.shape[1] :]
    with torch.no_grad():
        beams = model.generate(ids, attention_mask=mask, max_new_tokens=4, num_beams=3, do_sample=False, pad_token_id=0)
    for i, seq in enumerate(seqs):
        reference = greedy_no_cache(model, seq[None], 6)[0, len(seq) :]
        assert torch.equal(batch[i], reference)
        with torch.no_grad():  # beam search (the cache reordered between beams) gives each row's unpadded beams too
            alone = model.generate(seq[None], max_new_tokens=4, num_beams=3, do_sample=False, pad_token_id=0)
        assert torch.equal(beams[i, ids.shape[1] :], alone[0, len(seq) :])
    with disable_adapters(model):
        assert not torch.equal(generate(model, ids, mask, 6)[:, ids.shape[1] :], batch)


def test_cache_continuation_equals_one_forward():
    model, _ = _adapted("llama")
    model.eval()
    ids = token_batch(2, 8)
    with torch.no_grad():
        full = model(input_ids=ids).logits
        first = model(input_ids=ids[:, :5], use_cache=True)
        assert first.cache.get_seq_length() == N + 5
        rest = model(input_ids=ids[:, 5:], past_key_values=first.cache, attention_mask=torch.ones(2, 8).long())
    torch.testing.assert_close(rest.logits, full[:, 5:], atol=1e-5, rtol=1e-5)


def test_disable_and_unload_restore_the_base_outputs_exactly():
    ids = token_batch(2, 6)
    model = tiny_model("llama")
    with torch.no_grad():
        before = model(input_ids=ids).logits
    inject_adapters(model, PrefixTuningConfig(num_virtual_tokens=N, prefix_projection=True))
    with torch.no_grad(), disable_adapters(model):
        assert torch.equal(model(input_ids=ids).logits, before)
    unload_adapters(model, merge=False)
    assert not model._forward_pre_hooks and not model._forward_hooks
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


def test_settings_rebuild_the_module():
    _, module = _adapted("llama", projection=True)
    again = PrefixKV(tiny_model("llama"), **module.settings())
    assert again.settings() == module.settings()
    assert [p.shape for p in again.parameters()] == [p.shape for p in module.parameters()]
    with pytest.raises(ValueError, match=r"made for \(layers, key/value heads, head dim\) = \(5, None, None\)"):
        PrefixKV(tiny_model("llama"), num_virtual_tokens=N, num_layers=5)


class _CacheButNoConfig(NoCacheLM):
    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, past_key_values=None):  # type: ignore[override]
        return super().forward(input_ids, inputs_embeds, attention_mask)


def test_models_without_an_attention_cache_are_refused():
    for model in (NoCacheLM(), NoEmbeddings()):
        with pytest.raises(ValueError, match="exposes no attention cache, so prefix tuning is impossible"):
            inject_adapters(model, PrefixTuningConfig())
    with pytest.raises(ValueError, match="is not a transformers model"):
        inject_adapters(_CacheButNoConfig(), PrefixTuningConfig())


def test_gradient_checkpointing_in_training_is_refused():
    model, _ = _adapted("llama")
    model.gradient_checkpointing_enable()
    model.train()
    ids = token_batch(2, 5)
    with pytest.raises(RuntimeError, match="gradient checkpointing is on"):
        model(input_ids=ids, labels=ids)
    with torch.no_grad():  # no backward, nothing is checkpointed: the cache is kept
        model(input_ids=ids)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(encoder_hidden_size=16), "sizes the MLP of prefix_projection=True"),
        (dict(prefix_projection="yes"), "prefix_projection='yes'"),
        (dict(prefix_projection=True, encoder_hidden_size=-2), "encoder_hidden_size=-2"),
        (dict(num_virtual_tokens=2.5), "num_virtual_tokens=2.5"),
        (dict(target_modules="attention"), "has no target modules"),
    ],
)
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PrefixTuningConfig(**kwargs)


class _Scale(nn.Module):
    """A test-only adapter on a linear layer: ``base(x) * (1 + s)``, ``s`` one trained scalar."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base_layer, self.disabled = base, False
        self.s = nn.Parameter(torch.zeros(()))

    def adapter_params(self) -> list[str]:
        return ["s"]

    def settings(self) -> dict:
        return {}

    def export_state(self) -> tuple[dict, dict]:
        return {"s": self.s.detach()}, {}

    def forward(self, x):
        out = self.base_layer(x)
        return out if self.disabled else out * (1 + self.s)


@dataclass(kw_only=True)
class _ScaleConfig(AdapterConfig):
    method: ClassVar[str] = "test_scale"

    def layer_kwargs(self, name, *, initialize=True):
        return {}


@dataclass(kw_only=True)
class _ScalePlusPrefix(AdapterConfig):
    """Shaped as MAM: an adapter on some layers plus prefix tuning, each planned by its own config."""

    method: ClassVar[str] = "test_scale_prefix"

    def parts(self, model):
        prefix = PrefixTuningConfig(num_virtual_tokens=N, prefix_projection=True)
        return [_ScaleConfig(target_modules=["o_proj"]), prefix]

    def layer_kwargs(self, name, *, initialize=True):
        raise AssertionError("a composite's layers are built by its parts")


def test_prefix_as_a_part_of_a_composite_method(tmp_path, monkeypatch):
    """A composite config plans its parts; saved in our own format (no PEFT type), it loads into a fresh model with
    the same outputs (the prefix MLP saved as its output table)."""
    monkeypatch.setitem(_METHODS, "test_scale", Method("test_scale", _ScaleConfig, _Scale, "linear", (_Scale,)))
    composite = Method("test_scale_prefix", _ScalePlusPrefix, _Scale, "linear", ())
    monkeypatch.setitem(_METHODS, "test_scale_prefix", composite)
    model = tiny_model("llama")
    names = inject_adapters(model, _ScalePlusPrefix())
    assert names == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj", "prefix_tuning"]
    randomize(model)
    out = save_adapter(model, tmp_path / "adapter")
    assert json.loads((out / "adapter_config.json").read_text())["format"] == "lightning_zenft"
    fresh = tiny_model("llama")
    load_adapter(fresh, out)
    assert fresh.prefix_tuning.prefix_projection is False
    ids = token_batch(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6, rtol=1e-6)

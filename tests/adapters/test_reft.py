"""LoReFT against the paper's formula (written here with loops over sequences and tokens), its positions on padded
batches, generation with a KV cache, R kept orthonormal by a parametrization, and its errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from zenft_testing import tiny_model, token_batch

from lightning_zenft import (
    LoReFTConfig,
    LoReFTLayer,
    find_adapters,
    inject_adapters,
    load_adapter,
    merge_adapters,
    save_adapter,
    unload_adapters,
)


def _randomize(model: nn.Module, seed: int = 0) -> None:
    """Stand-in for training: move every trainable tensor (R stays orthonormal: it is computed from them)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


def _chosen(real: list[int], first: int, last: int) -> list[int]:
    """The positions the paper's "first p, last s" picks among a sequence's real token indices."""
    return sorted(set(real[:first]) | set(real[len(real) - last :]))


def _edit_rows(h, mask, first, last, weights, fixed=None):
    """``h + R^T (W h + b - R h)`` token by token at the chosen positions of each sequence (``fixed``: given ones)."""
    rotation, w, b = weights
    out = h.clone()
    for i in range(h.shape[0]):
        real = [t for t in range(h.shape[1]) if mask is None or mask[i, t]]
        for t in fixed[i] if fixed is not None else _chosen(real, first, last):
            x = h[i, t]
            out[i, t] = x + rotation.T @ (w @ x + b - rotation @ x)
    return out


def _weights(layer: LoReFTLayer):
    return (layer.rotate.weight.detach(), layer.learned_source.weight.detach(), layer.learned_source.bias.detach())


def _reference(base: nn.Module, adapted: nn.Module, first: int, last: int, state: dict) -> None:
    """Hooks on ``base``'s blocks applying the formula with ``adapted``'s values, at the positions of ``state``."""
    for name, layer in find_adapters(adapted):
        weights = _weights(layer)

        def hook(module, args, output, weights=weights):
            return _edit_rows(output, state.get("mask"), first, last, weights, state.get("fixed"))

        base.get_submodule(name).register_forward_hook(hook)


def _padded(lengths: list[int], side: str, seed: int = 5):
    """Sequences of the given lengths in one batch, padded left or right (pad id 0), with their mask and positions."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, 120, (n,), generator=g) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, span], mask[i, span] = row, 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return rows, ids, mask, positions


def test_layer_equals_the_formula_and_r_is_orthonormal():
    block = tiny_model("llama").model.layers[0]
    layer = LoReFTLayer(block, r=3, first_positions=2, last_positions=1)
    assert parametrize.is_parametrized(layer.rotate, "weight")
    assert layer.adapter_params()[0] == "rotate.parametrizations.weight.original"
    _randomize(layer)
    rotation = layer.rotate.weight
    torch.testing.assert_close(rotation @ rotation.T, torch.eye(3), atol=1e-5, rtol=0)
    model = nn.ModuleDict({"block": layer})  # no attention_mask anywhere above: every token is real
    layer.install(model)
    hidden = torch.randn(2, 6, 32)
    position = tiny_model("llama").model.rotary_emb(hidden, torch.arange(6)[None])
    with torch.no_grad():
        got = layer(hidden, position_embeddings=position)
        base = block(hidden, position_embeddings=position)
    want = _edit_rows(base, None, 2, 1, _weights(layer))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert torch.equal(got[:, 2:5], base[:, 2:5])  # positions 0, 1 and 5 only


# (3, 3) on a sequence of 4 real tokens: the first and last positions overlap, and their union is edited
@pytest.mark.parametrize(("arch", "first", "last"), [("llama", 3, 3), ("gpt2", 2, 0), ("llama", 0, 3)])
def test_model_equals_the_formula_with_a_padded_batch(arch, first, last):
    model = tiny_model(arch)
    inject_adapters(model, LoReFTConfig(r=4, first_positions=first, last_positions=last))
    _randomize(model)
    reference, state = tiny_model(arch), {}
    _reference(reference, model, first, last, state)
    _, ids, mask, positions = _padded([7, 4, 9], "left")
    state["mask"] = mask
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        want = reference(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batches_equal_unpadded_sequences(side):
    model = tiny_model("llama")
    inject_adapters(model, LoReFTConfig(r=4, first_positions=2, last_positions=2))
    _randomize(model)
    rows, ids, mask, positions = _padded([8, 5, 3], side)
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        for i, row in enumerate(rows):
            alone = model(input_ids=row[None]).logits[0]  # no mask: every token real
            torch.testing.assert_close(batch[i][mask[i].bool()], alone, atol=1e-5, rtol=1e-5)
        base = tiny_model("llama")(input_ids=rows[2][None]).logits[0]
    assert (alone - base).abs().max() > 1e-3  # the intervention does change the output


def test_generate_intervenes_on_the_prompt_and_equals_a_reference():
    model = tiny_model("llama")
    inject_adapters(model, LoReFTConfig(r=4, first_positions=1, last_positions=2))
    _randomize(model, seed=2)
    _, ids, mask, _ = _padded([6, 4], "left", seed=9)
    with torch.no_grad():
        got = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        base = tiny_model("llama").generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    # Reference: no cache, the whole sequence every step, the formula at the PROMPT's first/last real tokens.
    reference = tiny_model("llama")
    real = [[t for t in range(ids.shape[1]) if mask[i, t]] for i in range(2)]
    state = {"fixed": [_chosen(r, 1, 2) for r in real]}
    _reference(reference, model, 1, 2, state)
    seq, seq_mask = ids, mask
    with torch.no_grad():
        for _ in range(6):
            positions = (seq_mask.cumsum(-1) - 1).masked_fill(seq_mask == 0, 1)
            logits = reference(input_ids=seq, attention_mask=seq_mask, position_ids=positions, use_cache=False).logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            seq_mask = torch.cat([seq_mask, torch.ones_like(seq_mask[:, :1])], dim=1)
    assert torch.equal(got, seq)
    assert not torch.equal(got, base)


def test_a_cached_prompt_gives_the_logits_of_a_full_forward():
    model = tiny_model("gpt2")
    inject_adapters(model, LoReFTConfig(r=2, first_positions=1, last_positions=1))
    _randomize(model)
    ids = token_batch(2, 9)
    with torch.no_grad():
        full = model(input_ids=ids).logits
        prompt = model(input_ids=ids[:, :8], use_cache=True)
        step = model(input_ids=ids[:, 8:], past_key_values=prompt.past_key_values).logits
        edited_last = model(input_ids=ids[:, :8]).logits  # the prompt's own last token is edited in both
    torch.testing.assert_close(prompt.logits, edited_last, atol=0, rtol=0)
    # The decoding step is not intervened on: in a full forward its token is the last one and would be.
    assert not torch.allclose(step[:, 0], full[:, 8], atol=1e-4)
    for _, layer in find_adapters(model):
        layer.last_positions = 0  # a full forward that edits only the first token matches the cached run
    with torch.no_grad():
        first_only = model(input_ids=ids).logits
        cached = model(input_ids=ids[:, 8:], past_key_values=model(ids[:, :8], use_cache=True).past_key_values)
    torch.testing.assert_close(cached.logits[:, 0], first_only[:, 8], atol=1e-5, rtol=1e-5)


def test_gradients_reach_only_the_interventions_and_r_stays_orthonormal():
    model = tiny_model("llama")
    inject_adapters(model, LoReFTConfig(r=4))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{n}.{p}" for n, layer in find_adapters(model) for p in layer.adapter_params()
    }
    optimizer = torch.optim.AdamW(trainable, lr=0.05, weight_decay=0.5)  # decay also hits entries with no gradient
    layer = model.model.layers[0]
    start = layer.rotate.weight.detach().clone()
    ids = token_batch()
    for _ in range(5):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
        optimizer.step()
    rotation = layer.rotate.weight
    assert (rotation - start).abs().max() > 1e-3  # R moved...
    torch.testing.assert_close(rotation @ rotation.T, torch.eye(4), atol=1e-5, rtol=0)  # ...and stayed orthonormal


def test_a_position_beyond_the_sequence_and_a_foreign_mask_are_errors():
    model = tiny_model("llama")
    inject_adapters(model, LoReFTConfig(first_positions=3, last_positions=1))
    _, ids, mask, _ = _padded([5, 2], "right")
    with pytest.raises(ValueError, match="needs 3 real tokens per sequence, but sequence 1 of the batch has 2"):
        model(input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match="needs 3 real tokens .* sequence 0 of the batch has 2"):
        model(input_ids=ids[:, :2])
    with pytest.raises(ValueError, match="needs 3 real tokens"):
        model.generate(ids[:1, :2], max_new_tokens=2, do_sample=False, pad_token_id=0)
    layer = model.model.layers[0]
    with pytest.raises(ValueError, match="2-D attention_mask .* \\(2, 5\\), but .* shape \\(2, 1, 5, 5\\)"):
        layer.positions(torch.ones(2, 1, 5, 5), 2, 5, torch.device("cpu"))


def test_install_is_required_and_unload_removes_the_hooks():
    block = tiny_model("llama").model.layers[0]
    layer = LoReFTLayer(block, r=2)
    hidden = torch.randn(1, 4, 32)
    position = tiny_model("llama").model.rotary_emb(hidden, torch.arange(4)[None])
    with pytest.raises(RuntimeError, match="call layer.install\\(model\\)"):
        layer(hidden, position_embeddings=position)
    with pytest.raises(ValueError, match="not inside the Linear given to install"):
        layer.install(nn.Linear(2, 2))
    model = tiny_model("llama")
    ids, mask = token_batch(), torch.ones(2, 12, dtype=torch.long)
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
    inject_adapters(model, LoReFTConfig())
    assert len(model.model._forward_pre_hooks) == 2  # LlamaModel's forward takes the mask: one hook a layer
    assert len(model._forward_pre_hooks) == 0
    with pytest.raises(TypeError, match="LoReFTLayer adapters cannot be merged"):
        merge_adapters(model)
    unload_adapters(model, merge=False)
    assert len(model.model._forward_pre_hooks) == 0
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, base, atol=0, rtol=0)


def test_a_deep_copy_reads_its_own_masks():
    model = tiny_model("llama")
    inject_adapters(model, LoReFTConfig(first_positions=0, last_positions=1))
    _randomize(model)
    twin = copy.deepcopy(model)
    rows, ids, mask, positions = _padded([6, 3], "right")
    with torch.no_grad():
        got = twin(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        alone = twin(input_ids=rows[1][None]).logits[0]
    torch.testing.assert_close(got[1][mask[1].bool()], alone, atol=1e-5, rtol=1e-5)
    assert model.model.layers[0]._mask is None  # the original saw none of the copy's calls


def test_own_format_round_trip(tmp_path):
    model = tiny_model("gpt2")
    inject_adapters(model, LoReFTConfig(r=3, first_positions=2, last_positions=1, target_modules=["h.1"]))
    _randomize(model)
    out = save_adapter(model, tmp_path / "reft")
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["method"] == "loreft" and list(saved["layers"]) == ["transformer.h.1"]
    assert saved["layers"]["transformer.h.1"]["settings"] == {
        "r": 3,
        "first_positions": 2,
        "last_positions": 1,
        "dropout": 0.0,
    }
    fresh = tiny_model("gpt2")
    load_adapter(fresh, out)
    _, ids, mask, positions = _padded([6, 4], "left")
    with torch.no_grad():
        got = fresh(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        want = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(r=0), "r=0 must be a positive integer"),
        (dict(first_positions=-1), "first_positions=-1 must be a non-negative integer"),
        (dict(last_positions=1.5), "last_positions=1.5 must be a non-negative integer"),
        (dict(first_positions=0, last_positions=0), "intervene nowhere"),
        (dict(dropout=-0.1), "dropout=-0.1 must be in"),
        (dict(target_modules="all-linear"), "LoReFT intervenes on block outputs"),
        (dict(bias="lora_only"), "bias='lora_only'"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoReFTConfig(**kwargs)


def test_module_errors():
    block = tiny_model("llama").model.layers[0]
    with pytest.raises(ValueError, match="rank r=33 must be between 1 and the hidden size 32"):
        LoReFTLayer(block, r=33)
    with pytest.raises(ValueError, match="one of them positive"):
        LoReFTLayer(block, first_positions=0, last_positions=0)
    with pytest.raises(ValueError, match="matches no block module .* Its block modules"):
        inject_adapters(tiny_model("llama"), LoReFTConfig(target_modules=["mlp"]))

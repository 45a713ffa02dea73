"""Prompt tuning and p-tuning: the model run on [P; E(x)] (P from the paper's encoders), padding, cache, generate."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from prompt_testing import (
    CachePositionLM,
    NoEmbeddings,
    generate,
    greedy_no_cache,
    padded,
    randomize,
    rows,
)
from zenft_testing import load_base, tiny_model, token_batch

from lightning_zenft import (
    DEFAULT_BASE_MODEL_DIR,
    PromptEncoder,
    PromptTuningConfig,
    PTuningConfig,
    SoftPrompt,
    disable_adapters,
    find_adapters,
    inject_adapters,
    merge_adapters,
    unload_adapters,
)

N = 3
CONFIGS = {
    "prompt": lambda: PromptTuningConfig(num_virtual_tokens=N),
    "mlp": lambda: PTuningConfig(num_virtual_tokens=N, encoder_hidden_size=12),
    "lstm": lambda: PTuningConfig(num_virtual_tokens=N, encoder_type="lstm", encoder_hidden_size=6),
    "none": lambda: PTuningConfig(num_virtual_tokens=N, encoder_type="none"),
}


def _adapted(arch: str, kind: str, seed: int = 0):
    model = tiny_model(arch, seed)
    inject_adapters(model, CONFIGS[kind]())
    randomize(model, seed=3)
    ((_, module),) = find_adapters(model)
    return model, module


# ---------------------------------------------------------------------------------------------------- references
def _lstm_reference(x: torch.Tensor, p: dict[str, torch.Tensor], layers: int) -> torch.Tensor:
    """A bidirectional LSTM over the rows of ``x`` ``(n, d)``, written from the gate equations."""
    n = x.shape[0]
    for layer in range(layers):
        outs = []
        for suffix, order in (("", range(n)), ("_reverse", range(n - 1, -1, -1))):
            w_ih, w_hh = p[f"weight_ih_l{layer}{suffix}"], p[f"weight_hh_l{layer}{suffix}"]
            b = p[f"bias_ih_l{layer}{suffix}"] + p[f"bias_hh_l{layer}{suffix}"]
            h = x.new_zeros(w_hh.shape[1])
            c = x.new_zeros(w_hh.shape[1])
            seq = [None] * n
            for t in order:
                i, f, g, o = (w_ih @ x[t] + w_hh @ h + b).chunk(4)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                seq[t] = h
            outs.append(torch.stack(seq))
        x = torch.cat(outs, dim=-1)  # (n, 2h)
    return x


def _virtual_reference(module, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """The virtual embeddings P from the papers' formulas over the module's (leaf copies of) tensors."""
    if isinstance(module, SoftPrompt) or module.encoder_type == "none":
        return params["prompt_embeddings"]
    x = params["embedding"]  # (n, d)
    if module.encoder_type == "lstm":
        lstm = {k.removeprefix("lstm_head."): v for k, v in params.items() if k.startswith("lstm_head.")}
        x = _lstm_reference(x, lstm, module.lstm_head.num_layers)
        return F.linear(F.relu(F.linear(x, params["mlp_head.0.weight"], params["mlp_head.0.bias"])),
                        params["mlp_head.2.weight"], params["mlp_head.2.bias"])  # fmt: skip
    for i in (0, 2):
        x = F.relu(F.linear(x, params[f"mlp_head.{i}.weight"], params[f"mlp_head.{i}.bias"]))
    return F.linear(x, params["mlp_head.4.weight"], params["mlp_head.4.bias"])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_forward_and_gradients_equal_the_model_on_prepended_embeddings(arch, kind):
    model, module = _adapted(arch, kind)
    reference = tiny_model(arch)  # the same frozen base, no hooks
    ids = token_batch(2, 7)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # some padding
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()

    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in module.named_parameters()}
    prompts = _virtual_reference(module, leaves)  # (n, d)
    embeds = reference.get_input_embeddings()(ids)  # (B, T, d)
    full = torch.cat([prompts.expand(2, -1, -1), embeds], dim=1)  # (B, n+T, d)
    ext = torch.cat([torch.ones(2, N, dtype=mask.dtype), mask], dim=1)
    labels = torch.cat([torch.full((2, N), -100), ids], dim=1)
    want = reference(inputs_embeds=full, attention_mask=ext, labels=labels, position_ids=(ext.cumsum(-1) - 1).clamp(0))
    want.loss.backward()

    torch.testing.assert_close(out.logits, want.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, want.loss, atol=1e-6, rtol=1e-6)
    assert out.logits.shape == (2, N + 7, 128)  # outputs cover the virtual positions too, as PEFT's do
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained == {f"{CONFIGS[kind]().attach_name}.{n}" for n in module.adapter_params()}
    for name, param in module.named_parameters():
        torch.testing.assert_close(param.grad, leaves[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_p_tuning_encoder_shapes_follow_the_paper():
    _, mlp = _adapted("llama", "mlp")
    assert [type(m).__name__ for m in mlp.mlp_head] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert mlp.mlp_head[0].in_features == 32 and mlp.mlp_head[0].out_features == 12
    _, lstm = _adapted("llama", "lstm")
    assert lstm.lstm_head.bidirectional and lstm.lstm_head.num_layers == 2 and lstm.lstm_head.hidden_size == 6
    assert lstm.mlp_head[0].in_features == 12 and lstm.mlp_head[2].out_features == 32
    _, none = _adapted("llama", "none")
    assert none.adapter_params() == ["prompt_embeddings"]


# ---------------------------------------------------------------------------------------------------- padding, cache
@pytest.mark.parametrize(("arch", "kind"), [("llama", "prompt"), ("gpt2", "prompt"), ("gpt2", "lstm")])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("given_positions", [False, True])
def test_padded_batches_equal_unpadded_rows(arch, kind, side, given_positions):
    model, _ = _adapted(arch, kind)
    model.eval()
    seqs = rows()
    ids, mask = padded(seqs, side)
    kwargs = {"position_ids": (mask.cumsum(-1) - 1).clamp(0)} if given_positions else {}
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask, **kwargs).logits  # (B, n+W, V)
        for i, seq in enumerate(seqs):
            alone = model(input_ids=seq[None]).logits[0]  # (n+L, V)
            width, length = ids.shape[1], len(seq)
            real = slice(N + width - length, N + width) if side == "left" else slice(N, N + length)
            torch.testing.assert_close(batch[i, real], alone[N:], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(batch[i, :N], alone[:N], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("arch", "kind"), [("llama", "prompt"), ("gpt2", "mlp")])
def test_generate_equals_no_cache_greedy_and_unpadded_rows(arch, kind):
    model, _ = _adapted(arch, kind)
    model.eval()
    seqs = rows(lengths=(5, 3))
    ids, mask = padded(seqs, "left")
    batch = generate(model, ids, mask, 6)[:, ids.shape[1] :]
    for i, seq in enumerate(seqs):
        reference = greedy_no_cache(model, seq[None], 6)[0, len(seq) :]
        assert torch.equal(batch[i], reference)
        assert torch.equal(generate(model, seq[None], torch.ones_like(seq[None]), 6)[0, len(seq) :], reference)
    with disable_adapters(model):  # the virtual tokens change what is generated
        assert not torch.equal(generate(model, ids, mask, 6)[:, ids.shape[1] :], batch)


def test_cache_continuation_equals_one_forward():
    model, _ = _adapted("llama", "prompt")
    model.eval()
    ids = token_batch(2, 8)
    with torch.no_grad():
        full = model(input_ids=ids).logits  # (B, n+8, V)
        first = model(input_ids=ids[:, :5], attention_mask=torch.ones(2, 5, dtype=torch.long), use_cache=True)
        rest = model(input_ids=ids[:, 5:], cache=first.cache, attention_mask=torch.ones(2, 8, dtype=torch.long))
    torch.testing.assert_close(rest.logits, full[:, N + 5 :], atol=1e-5, rtol=1e-5)


def test_refuses_a_cache_filled_without_the_adapter_and_a_mask_that_does_not_fit():
    model, _ = _adapted("llama", "prompt")
    ids = token_batch(2, 6)
    with torch.no_grad(), disable_adapters(model):
        plain = model(input_ids=ids[:, :4], use_cache=True).cache
    with pytest.raises(RuntimeError, match="not filled with this adapter on"):
        model(input_ids=ids[:, 4:], cache=plain)
    with torch.no_grad():
        primed = model(input_ids=ids[:, :4], use_cache=True).cache
    with pytest.raises(ValueError, match="mask covers 7 positions, but the cache holds 4 real positions"):
        model(input_ids=ids[:, 4:], cache=primed, attention_mask=torch.ones(2, 7, dtype=torch.long))


def test_chunked_prefill_works_and_generate_given_back_its_cache_is_refused():
    model, _ = _adapted("gpt2", "prompt")
    model.eval()
    ids = token_batch(1, 9)
    reference = greedy_no_cache(model, ids, 4)
    with torch.no_grad():
        chunked = model.generate(ids, max_new_tokens=4, do_sample=False, prefill_chunk_size=4, pad_token_id=0)
        assert torch.equal(chunked, reference)
        first = model.generate(ids, max_new_tokens=2, do_sample=False, return_dict_in_generate=True, pad_token_id=0)
        with pytest.raises(ValueError, match=r"position ids start at \[2\], but the cache holds 10 real positions"):
            model.generate(first.sequences, cache=first.cache, max_new_tokens=2, do_sample=False, pad_token_id=0)


def test_disable_and_unload_restore_the_base_outputs_exactly():
    ids = token_batch(2, 6)
    model = tiny_model("gpt2")
    with torch.no_grad():
        before = model(input_ids=ids).logits
    inject_adapters(model, CONFIGS["lstm"]())
    with torch.no_grad(), disable_adapters(model):
        assert torch.equal(model(input_ids=ids).logits, before)
    assert unload_adapters(model, merge=False) == ["p_tuning"]
    assert not hasattr(model, "p_tuning") and not model._forward_pre_hooks and not model._forward_hooks
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


# ---------------------------------------------------------------------------------------------------- initialization
def test_random_init_is_on_the_scale_of_the_embeddings():
    model = tiny_model("llama")
    scale = model.get_input_embeddings().weight.std()
    inject_adapters(model, PromptTuningConfig(num_virtual_tokens=64))
    table = model.prompt_tuning.prompt_embeddings
    assert table.shape == (64, 32)
    assert 0.85 < (table.std() / scale).item() < 1.15  # 2048 draws: the std's relative error is about 1.6%
    assert abs(table.mean().item()) < 0.1 * scale.item()


def test_vocab_init_copies_rows_of_the_embedding():
    model = tiny_model("llama")
    inject_adapters(model, PromptTuningConfig(num_virtual_tokens=6, init="vocab"))
    weight = model.get_input_embeddings().weight
    table = model.prompt_tuning.prompt_embeddings
    assert all(bool((weight == row).all(-1).any()) for row in table)


@pytest.mark.parametrize("n", [2, 7])
def test_text_init_takes_the_embeddings_of_the_text_repeated_or_cut(n):
    from transformers import AutoTokenizer

    model = load_base(DEFAULT_BASE_MODEL_DIR)
    text = "def main():"
    inject_adapters(model, PromptTuningConfig(num_virtual_tokens=n, init="text", init_text=text))
    ids = AutoTokenizer.from_pretrained(DEFAULT_BASE_MODEL_DIR)(text)["input_ids"]
    assert 2 < len(ids) < 7
    wanted = [ids[i % len(ids)] for i in range(n)]
    weight = model.get_input_embeddings().weight
    assert torch.equal(model.prompt_tuning.prompt_embeddings, weight[wanted])
    assert model.prompt_tuning.settings()["tokenizer"] == str(DEFAULT_BASE_MODEL_DIR)  # the model's own, recorded


def test_text_init_errors(tmp_path):
    with pytest.raises(ValueError, match="loading .* failed"):
        inject_adapters(tiny_model(), PromptTuningConfig(init="text", init_text="hi", tokenizer=str(tmp_path)))
    with pytest.raises(ValueError, match="does not say where it was loaded from"):
        inject_adapters(tiny_model(), PromptTuningConfig(init="text", init_text="hi"))
    with pytest.raises(ValueError, match="beyond the model's 128 embeddings"):
        config = PromptTuningConfig(init="text", init_text="a longer text", tokenizer=str(DEFAULT_BASE_MODEL_DIR))
        inject_adapters(tiny_model(), config)


# ---------------------------------------------------------------------------------------------------- errors
def test_impossible_models_and_calls_raise_clear_errors():
    with pytest.raises(ValueError, match="has no input embeddings"):
        inject_adapters(NoEmbeddings(), PromptTuningConfig())
    with pytest.raises(ValueError, match="takes `cache_position`"):
        inject_adapters(CachePositionLM(), PTuningConfig())
    model, _ = _adapted("gpt2", "prompt")
    ids = token_batch(2, 5)
    with pytest.raises(ValueError, match="token_type_ids cannot be given"):
        model(input_ids=ids, token_type_ids=torch.zeros_like(ids))
    with pytest.raises(ValueError, match="2-D attention masks"):
        model(input_ids=ids, attention_mask=torch.ones(2, 1, 5, 5))
    with pytest.raises(ValueError, match="packed sequences"):
        model(input_ids=ids, position_ids=torch.tensor([[0, 1, 2, 0, 1]] * 2))
    with pytest.raises(ValueError, match="already has an attribute 'prompt_tuning'"):
        inject_adapters(model, PromptTuningConfig())
    with pytest.raises(TypeError, match="cannot be merged"):
        merge_adapters(model)
    assert not hasattr(SoftPrompt, "merge") and not hasattr(PromptEncoder, "merge")


def test_a_wrapper_holding_two_models_is_refused():
    pair = torch.nn.ModuleDict({"student": tiny_model(), "teacher": tiny_model()})
    with pytest.raises(ValueError, match=r"holds 2 models with input embeddings \(\['student', 'teacher'\]\)"):
        inject_adapters(pair, PromptTuningConfig())
    inject_adapters(pair.student, PromptTuningConfig())  # the way out the message gives
    assert [n for n, _ in find_adapters(pair)] == ["student.prompt_tuning"]


def test_encoder_decoder_models_are_refused():
    import transformers as tf

    config = tf.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    with pytest.raises(ValueError, match="encoder-decoder"):
        inject_adapters(tf.T5ForConditionalGeneration(config), PromptTuningConfig())


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        (PromptTuningConfig, dict(num_virtual_tokens=0), "num_virtual_tokens=0"),
        (PromptTuningConfig, dict(target_modules=["q_proj"]), "has no target modules"),
        (PromptTuningConfig, dict(exclude_modules=["q_proj"]), "has no target modules"),
        (PromptTuningConfig, dict(bias="all"), "trains its virtual tokens only"),
        (PromptTuningConfig, dict(trainable_norms=True), "trains its virtual tokens only"),
        (PromptTuningConfig, dict(modules_to_save=["lm_head"]), "trains its virtual tokens only"),
        (PromptTuningConfig, dict(init="zeros"), "init='zeros'"),
        (PromptTuningConfig, dict(init="text"), "needs init_text"),
        (PromptTuningConfig, dict(init_text="hello"), "used by init='text' only"),
        (PromptTuningConfig, dict(tokenizer="gpt2"), "used by init='text' only"),
        (PTuningConfig, dict(encoder_type="gru"), "encoder_type='gru'"),
        (PTuningConfig, dict(encoder_num_layers=3), "apply to the 'lstm' encoder only"),
        (PTuningConfig, dict(encoder_dropout=0.1), "apply to the 'lstm' encoder only"),
        (PTuningConfig, dict(encoder_type="lstm", encoder_num_layers=1, encoder_dropout=0.1), "has none"),
        (PTuningConfig, dict(encoder_type="lstm", encoder_dropout=1.5), r"must be in \[0, 1\)"),
        (PTuningConfig, dict(encoder_type="none", encoder_hidden_size=8), "needs an encoder"),
        (PTuningConfig, dict(encoder_hidden_size=0), "encoder_hidden_size=0"),
    ],
)
def test_bad_options(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ValueError) as err:
        PTuningConfig(num_virtual_tokens=-1, encoder_type="gru", bias="all")
    assert all(s in str(err.value) for s in ("num_virtual_tokens=-1", "encoder_type='gru'", "bias='all'"))

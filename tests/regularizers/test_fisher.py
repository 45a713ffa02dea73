"""fisher_diagonal against the closed-form Fisher of softmax regression, and on tiny causal LMs."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zenft_testing import VOCAB, tiny_model

from lightning_zenft import LoRALinear
from lightning_zenft.regularizers import fisher_diagonal
from lightning_zenft.regularizers.fisher import causal_lm_logits

D, C = 5, 4


def softmax_regression(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    model = nn.Linear(D, C).double()
    with torch.no_grad():
        model.weight.mul_(3.0)  # confident, uneven predictions: p(1 - p) varies across classes and inputs
    return model


def inputs(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def analytic_fisher(model: nn.Linear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Diagonal of E_x[(diag(p) - p p^T) (x) x x^T]: F_W[c, d] = E[p_c (1 - p_c) x_d^2], F_b[c] = E[p_c (1 - p_c)]."""
    with torch.no_grad():
        p = torch.softmax(model(x), dim=-1)  # (n, C)
    v = p * (1 - p)  # (n, C)
    return (v.T @ x.square()) / x.shape[0], v.mean(0)


def logits_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return model(batch[0]), batch[1]


def batches_of(x: torch.Tensor, y: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def model_labels(model: nn.Module, x: torch.Tensor, seed: int) -> torch.Tensor:
    with torch.no_grad():
        p = torch.softmax(model(x), dim=-1)
    return torch.multinomial(p, 1, generator=torch.Generator().manual_seed(seed)).squeeze(1)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def test_exact_estimator_equals_the_closed_form():
    model, x = softmax_regression(), inputs(64)
    y = torch.zeros(64, dtype=torch.long)  # exact ignores the labels' values, only their mask
    fisher = fisher_diagonal(model, batches_of(x, y, 16), "exact", logits_fn=logits_fn)
    f_w, f_b = analytic_fisher(model, x)
    assert fisher.tokens == 64
    torch.testing.assert_close(fisher.diagonal["weight"].double(), f_w, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fisher.diagonal["bias"].double(), f_b, rtol=1e-5, atol=1e-7)


def test_sampled_estimator_converges_to_the_closed_form():
    model, x = softmax_regression(), inputs(64)
    y = torch.zeros(64, dtype=torch.long)
    fisher = fisher_diagonal(model, batches_of(x, y, 64), "sampled", logits_fn=logits_fn, samples=2000)
    f_w, f_b = analytic_fisher(model, x)
    assert rel_err(fisher.diagonal["weight"], f_w) < 0.03
    assert rel_err(fisher.diagonal["bias"], f_b) < 0.03


def test_empirical_estimator_is_the_fisher_only_when_labels_follow_the_model():
    model, x = softmax_regression(), inputs(1500)
    f_w, _ = analytic_fisher(model, x)
    y_model = model_labels(model, x, seed=3)
    near = fisher_diagonal(model, batches_of(x, y_model, 500), "empirical", logits_fn=logits_fn)
    assert rel_err(near.diagonal["weight"], f_w) < 0.08
    y_fixed = torch.zeros(1500, dtype=torch.long)  # labels unlike the model's: the empirical Fisher is something else
    far = fisher_diagonal(model, batches_of(x, y_fixed, 500), "empirical", logits_fn=logits_fn)
    assert rel_err(far.diagonal["weight"], f_w) > 0.5


def batched_mean_gradient_fisher(model: nn.Module, batches) -> torch.Tensor:
    """The widespread estimate this module avoids: square of the minibatch-mean gradient, averaged over batches."""
    total = torch.zeros_like(model.weight)
    for x, y in batches:
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        total += model.weight.grad.square()
    model.zero_grad()
    return total / len(batches)


def test_batched_mean_gradient_estimate_is_biased_and_ours_is_not():
    model, x = softmax_regression(), inputs(1024)
    f_w, _ = analytic_fisher(model, x)
    y = model_labels(model, x, seed=5)  # labels from the model: every per-example estimate is unbiased
    ours = {b: fisher_diagonal(model, batches_of(x, y, b), "empirical", logits_fn=logits_fn) for b in (1, 32)}
    torch.testing.assert_close(ours[1].diagonal["weight"], ours[32].diagonal["weight"])  # batching changes nothing
    assert rel_err(ours[32].diagonal["weight"], f_w) < 0.1
    theirs = {b: batched_mean_gradient_fisher(model, batches_of(x, y, b)) for b in (1, 32)}
    assert rel_err(theirs[1], f_w) < 0.1  # batch size 1 is the per-example estimate
    # at batch size B its expectation is F / B (+ the squared mean gradient): 32x too small here
    ratio = (theirs[32].sum() / f_w.sum()).item()
    assert 1 / 64 < ratio < 2 / 32
    assert rel_err(theirs[32], f_w) > 0.9


# ------------------------------------------------------------------------------------------------ causal LMs
def lm_batches(batch_size: int, seed: int = 7) -> list[dict[str, torch.Tensor]]:
    """Six right-padded sequences of lengths 5..10 with a masked prompt of 2 tokens each."""
    g = torch.Generator().manual_seed(seed)
    lengths = [5, 9, 7, 10, 6, 8]
    rows = [torch.randint(0, VOCAB, (n,), generator=g) for n in lengths]
    out = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        width = max(len(r) for r in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for j, r in enumerate(chunk):
            ids[j, : len(r)], mask[j, : len(r)] = r, 1
            labels[j, 2 : len(r)] = r[2:]
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


@pytest.mark.parametrize("estimator", ["sampled", "empirical"])
def test_lm_fisher_does_not_depend_on_batching_and_counts_target_tokens(estimator):
    model = tiny_model("llama")
    one = fisher_diagonal(model, lm_batches(1), estimator, seed=3)
    three = fisher_diagonal(model, lm_batches(3), estimator, seed=3)
    assert one.tokens == three.tokens == sum(n - 2 for n in [5, 9, 7, 10, 6, 8])  # the shifted labels past the prompt
    for name, value in one.diagonal.items():
        torch.testing.assert_close(three.diagonal[name], value, rtol=1e-4, atol=1e-9)


@pytest.mark.slow
def test_lm_sampled_units_are_unbiased_for_the_exact_fisher():
    """Sequence-level draws (one backward per example) and token-level draws both converge to the exact Fisher."""
    model = tiny_model("llama")
    data = lm_batches(1)[:2]  # two sequences, 10 target tokens
    params = {n: p for n, p in model.named_parameters() if n.endswith(("q_proj.weight", "down_proj.weight"))}
    exact = fisher_diagonal(model, data, "exact", params=params)
    seq = fisher_diagonal(model, data, "sampled", params=params, samples=1000, seed=1)
    tok = fisher_diagonal(model, data, "sampled", params=params, samples=200, unit="token", seed=1)
    for name in params:
        assert rel_err(seq.diagonal[name], exact.diagonal[name]) < 0.1, name
        assert rel_err(tok.diagonal[name], exact.diagonal[name]) < 0.1, name


def test_vectorized_and_per_unit_backward_paths_agree():
    model = tiny_model("llama")
    data = lm_batches(2)[:1]
    a = fisher_diagonal(model, data, "empirical", vectorize=True)
    b = fisher_diagonal(model, data, "empirical", vectorize=False)
    for name, value in a.diagonal.items():
        torch.testing.assert_close(b.diagonal[name], value, rtol=1e-4, atol=1e-10)


def test_model_modes_and_gradients_are_restored():
    model = tiny_model("llama").train()
    grad = torch.ones_like(model.lm_head.weight)
    model.lm_head.weight.grad = grad
    fisher_diagonal(model, lm_batches(3)[:1], "sampled")
    assert model.training and all(m.training for m in model.modules())
    assert model.lm_head.weight.grad is grad
    assert all(p.grad is None for n, p in model.named_parameters() if n != "lm_head.weight")


# ------------------------------------------------------------------------------------------- factored Fisher
def adapted_pair():
    """A tiny LM, and the same LM with LoRA on two projections (B = 0: the same function)."""
    base = tiny_model("llama")
    adapted = tiny_model("llama")
    torch.manual_seed(0)
    layers = {}
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        parent_name, child = name.rsplit(".", 1)
        parent = adapted.get_submodule(parent_name)
        layer = LoRALinear(getattr(parent, child), r=2, alpha=4)
        setattr(parent, child, layer)
        layers[name] = layer
    for p in adapted.parameters():
        p.requires_grad_(False)
    for layer in layers.values():
        layer.lora_A.weight.requires_grad_(True)
        layer.lora_B.weight.requires_grad_(True)
    return base, adapted, layers


@pytest.mark.parametrize("vectorize", [True, False])
def test_factored_fisher_keeps_the_dense_fishers_row_and_column_sums(vectorize):
    base, adapted, layers = adapted_pair()
    data = lm_batches(3)
    dense = fisher_diagonal(
        base, data, "sampled", params={n: base.get_submodule(n).weight for n in layers}, seed=2, vectorize=vectorize
    )
    factored = fisher_diagonal(adapted, data, "sampled", factored=layers, seed=2, vectorize=vectorize)
    assert not factored.diagonal
    for name in layers:
        want = dense.diagonal[name]  # (out, in)
        got = factored.factor_matrix(name)
        torch.testing.assert_close(got.sum(1), want.sum(1), rtol=1e-4, atol=1e-10)
        torch.testing.assert_close(got.sum(0), want.sum(0), rtol=1e-4, atol=1e-10)


def test_causal_lm_logits_without_labels_trains_every_attended_token():
    model = tiny_model("llama")
    batch = lm_batches(2)[0]
    batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    logits, labels = causal_lm_logits(model, batch)
    assert logits.shape[:2] == labels.shape
    assert (labels != -100).sum() == batch["attention_mask"][:, 1:].sum()


# ---------------------------------------------------------------------------------------------------- errors
def test_errors():
    model, x = softmax_regression(), inputs(8)
    masked = [(x, torch.full((8,), -100))]
    with pytest.raises(ValueError, match="no target tokens"):
        fisher_diagonal(model, masked, logits_fn=logits_fn)
    with pytest.raises(ValueError, match="no target tokens"):
        fisher_diagonal(model, [], logits_fn=logits_fn)
    y = torch.zeros(8, dtype=torch.long)
    with pytest.raises(ValueError, match="estimator='avalanche'"):
        fisher_diagonal(model, [(x, y)], "avalanche", logits_fn=logits_fn)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="samples=0"):
        fisher_diagonal(model, [(x, y)], samples=0, logits_fn=logits_fn)
    with pytest.raises(ValueError, match="unit='sequence'"):
        fisher_diagonal(model, [(x, y)], "empirical", unit="sequence", logits_fn=logits_fn)
    with pytest.raises(ValueError, match="unit='word'"):
        fisher_diagonal(model, [(x, y)], unit="word", logits_fn=logits_fn)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="4 classes"):
        fisher_diagonal(model, [(x, y)], "exact", max_exact_classes=3, logits_fn=logits_fn)
    with pytest.raises(TypeError, match="logits_fn"):
        fisher_diagonal(model, [(x, y)])  # tuples are not causal-LM dicts
    frozen = softmax_regression().requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to estimate"):
        fisher_diagonal(frozen, [(x, y)], logits_fn=logits_fn)


def test_non_finite_outputs_name_the_broken_parameter():
    model = softmax_regression()
    with torch.no_grad():
        model.bias[0] = float("inf")
    x, y = inputs(4), torch.zeros(4, dtype=torch.long)
    with pytest.raises(FloatingPointError, match="NaN or inf: \\['bias'\\]"):
        fisher_diagonal(model, [(x, y)], "empirical", logits_fn=logits_fn)


def test_overflowing_fisher_names_the_parameter():
    model = softmax_regression().float()
    with torch.no_grad():
        model.weight.zero_()  # finite outputs whatever the input
    x, y = torch.full((4, D), 1e30), torch.zeros(4, dtype=torch.long)  # squared gradients overflow fp32
    with pytest.raises(FloatingPointError, match="Fisher of parameter 'weight'"):
        fisher_diagonal(model, [(x, y)], "empirical", logits_fn=logits_fn)

"""Edge cases of the newest kernels: fused DoRA (kernel, layer, norm cache, PEFT interop, Trainer), the TMA GEMM and
the three-way ``auto`` choice, ``dual_lowrank``, unused group outputs, the MLP's early stop, and LoRALinear's
``weight``/``bias`` delegated to the base layer.

Every reference is plain PyTorch; several tests are regression tests of bugs they found (the DoRA norm cache, TMA on
empty or unreadable operands, the auto choice's cache, saving adapters from a fused model, DoRA output heads under the
fused cross-entropy, tied heads).
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint
from zenft_testing import TinyLM, close, make_trainer, tiny_model, token_batch

import lightning_zenft.kernels.lora as kernels_lora
import lightning_zenft.kernels.matmul as mm
from lightning_zenft import LoRAConfig, inject_adapters
from lightning_zenft.adapters import DoRALinear, LoRALinear
from lightning_zenft.callbacks.export import SaveAdapter
from lightning_zenft.callbacks.kernels import FusedKernels
from lightning_zenft.callbacks.lora import DoRA
from lightning_zenft.fusion import FusedDoRALinear, fuse_lora_layers, unfuse_lora_layers
from lightning_zenft.inject import count_parameters
from lightning_zenft.io import load_adapter, save_adapter
from lightning_zenft.kernels import (
    LoRAProjection,
    dequantize_nf4_reference,
    dual_lowrank,
    fused_dora,
    fused_lora_group,
    fused_lora_mlp,
    lowrank_matmul,
    quantize_nf4,
    set_matmul_backend,
)
from lightning_zenft.kernels._triton import interpret_mode, triton_installed, triton_module
from lightning_zenft.kernels.runtime import default_runtime

SEED = 4321  # the dropout seed every fused plan draws in the tests that pin it
NO_LIGER = {"rms_norm": False, "rope": False, "fused_linear_cross_entropy": False}
needs_interpreter = pytest.mark.skipif(
    torch.cuda.is_available() or not triton_installed(), reason="drives the Triton interpreter on CPU tensors"
)


# ------------------------------------------------------------------------------------------------------------ helpers
@pytest.fixture
def restore_backend() -> Iterator[None]:
    """Whatever a test sets, the matmul back end is ``auto`` again afterwards (and the choice cache is cleared)."""
    try:
        yield
    finally:
        set_matmul_backend("auto")


@pytest.fixture
def pinned_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every dropout plan draws :data:`SEED`, so a test can rebuild the kernels' mask with plain torch."""
    monkeypatch.setattr(kernels_lora, "_new_seed", lambda: SEED)


def plain_mask(rows: int, cols: int, p: float, dtype: torch.dtype) -> torch.Tensor:
    """``Bernoulli(1 - p) / (1 - p)`` from :data:`SEED`: the mask the kernels document for a seeded plan."""
    gen = torch.Generator().manual_seed(SEED)
    return torch.empty(rows, cols, dtype=dtype).bernoulli_(1.0 - p, generator=gen).div_(1.0 - p)


def dora_reference(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    m: torch.Tensor,
    s: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """HF PEFT's DoRA, plain: ``W x + b + (g - 1) W D x + g s B A D x`` with ``g = m / ||W + s B A||`` detached."""
    gain = m / torch.linalg.norm(w + s * (b @ a), dim=1).detach()
    xd = x if mask is None else x * mask
    return F.linear(x, w, bias) + (gain - 1) * F.linear(xd, w) + gain * s * F.linear(F.linear(xd, a), b)


def make_dora(
    k: int = 24, n: int = 18, r: int = 3, bias: bool = True, dtype: torch.dtype = torch.float32, seed: int = 0
) -> DoRALinear:
    """A DoRA layer as if trained: non-zero B and a magnitude moved away from ``||W||``."""
    torch.manual_seed(seed)
    layer = DoRALinear(nn.Linear(k, n, bias=bias), r=r, alpha=2 * r).to(dtype)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0.0, 0.3)
        layer.lora_magnitude_vector.mul_(torch.rand(n).to(dtype) + 0.5)
    return layer


def fused(layer: DoRALinear) -> DoRALinear:
    """``layer`` switched to the fused DoRA kernel in place (the way ``fuse_lora_layers`` does it)."""
    report = fuse_lora_layers(nn.Sequential(layer), warn=False)
    assert report.layers == ["0"] and type(layer) is FusedDoRALinear
    return layer


def layer_reference(layer: DoRALinear, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`dora_reference` on fp32 copies of ``layer``'s tensors (leaves requiring grad as the layer's do)."""
    base = layer.base_layer
    w = base.weight.detach().float()
    bias = None if base.bias is None else base.bias.detach().float().requires_grad_(base.bias.requires_grad)
    a, b, m = (t.detach().float().requires_grad_(t.requires_grad) for t in layer_params(layer))
    layer._ref_leaves = [a, b, m, bias]  # type: ignore[attr-defined]
    return dora_reference(x, w, bias, a, b, m, layer.scaling, mask)


def layer_params(layer: DoRALinear) -> list[torch.Tensor]:
    return [layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector]


def counted_ops(fn: Callable[[], object]) -> list[str]:
    """The aten ops ``fn`` dispatches."""

    class Log(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Log() as log:
        fn()
    return log.ops


# ------------------------------------------------------------------------------------------------ fused DoRA: layer
LAYER_CASES = ["plain", "trainable_bias", "frozen_a", "frozen_magnitude", "no_bias", "eval", "merged", "disabled"]


@pytest.mark.parametrize("case", LAYER_CASES)
def test_fused_dora_layer_matches_plain_dora(backend: str, case: str) -> None:
    """FusedDoRALinear on a 3-D input against the plain formula: output and every gradient, in each layer state."""
    layer = fused(make_dora(bias=case != "no_bias"))
    if case == "trainable_bias":
        layer.base_layer.bias.requires_grad_(True)
    if case == "frozen_a":
        layer.lora_A.weight.requires_grad_(False)
    if case == "frozen_magnitude":
        layer.lora_magnitude_vector.requires_grad_(False)
    if case == "eval":
        layer.eval()
    x = torch.randn(2, 5, 24, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    if case in ("merged", "disabled"):
        with torch.no_grad():
            want = layer_reference(layer, xr) if case == "merged" else layer.base_layer(xr)
        if case == "merged":
            layer.merge()
        else:
            layer.disabled = True
        got = layer(x)
        close(got, want, torch.float32, f"{case}: forward", fp32_tol=1e-5)
        return
    got = layer(x)
    want = layer_reference(layer, xr)
    dy = torch.randn_like(want)
    got.backward(dy)
    want.backward(dy)
    close(got, want, torch.float32, "forward")
    close(x.grad, xr.grad, torch.float32, "dx")
    a, b, m, bias = layer._ref_leaves
    mine = [*layer_params(layer), layer.base_layer.bias]
    for name, p, ref in zip(["dA", "dB", "dm", "dbias"], mine, [a, b, m, bias], strict=True):
        if p is None or not p.requires_grad:
            assert p is None or p.grad is None, f"{name}: a frozen tensor got a gradient"
            continue
        close(p.grad, ref.grad, torch.float32, name)
    assert layer.base_layer.weight.grad is None


def test_fused_dora_layer_under_autocast_bf16(backend: str) -> None:
    """An fp32 layer under bf16 autocast: a bf16 output close to the fp32 formula; fp32 gradients for fp32 params."""
    layer = fused(make_dora())
    layer.base_layer.bias.requires_grad_(True)
    x = torch.randn(7, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x)
    assert got.dtype == torch.bfloat16
    want = layer_reference(layer, x)
    dy = torch.randn_like(want)
    got.float().backward(dy)
    want.backward(dy)
    close(got, want, torch.bfloat16, "forward", low_tol=4e-2)
    a, b, m, bias = layer._ref_leaves
    mine = [*layer_params(layer), layer.base_layer.bias]
    for name, p, ref in zip(["dA", "dB", "dm", "dbias"], mine, [a, b, m, bias], strict=True):
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        close(p.grad, ref.grad, torch.bfloat16, name, low_tol=4e-2)


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("grads", ["all", "frozen_a_no_dx", "only_dx"])
def test_fused_dora_dropout_grad_combinations(backend: str, pinned_seed: None, nf4: bool, grads: str) -> None:
    """Dropout's second base product ``W (x - D x)`` with every requires_grad pattern, dense and NF4 bases, 3-D."""
    torch.manual_seed(5)
    k, n, r, s, p = 64, 20, 3, 1.5, 0.3
    x = torch.randn(2, 5, k).requires_grad_(grads != "frozen_a_no_dx")
    dense = torch.randn(n, k)
    weight = quantize_nf4(dense, dtype=torch.float32) if nf4 else dense
    w = dequantize_nf4_reference(weight).float() if nf4 else dense
    a = (torch.randn(r, k) * 0.2).requires_grad_(grads == "all")
    b = (torch.randn(n, r) * 0.2).requires_grad_(grads != "only_dx")
    m = (torch.rand(n) + 0.5).requires_grad_(grads != "only_dx")
    bias = torch.randn(n)
    y = fused_dora(x, weight, a, b, m, s, bias, dropout=p)
    mask = plain_mask(10, k, p, torch.float32).view(2, 5, k)
    assert 0 < int((mask == 0).sum()) < mask.numel()
    refs = [t.detach().clone().requires_grad_(t.requires_grad) for t in (x, a, b, m)]
    want = dora_reference(refs[0], w, bias, refs[1], refs[2], refs[3], s, mask)
    dy = torch.randn_like(want)
    y.backward(dy)
    want.backward(dy)
    close(y, want, torch.float32, "forward")
    for name, t, ref in zip(["dx", "dA", "dB", "dm"], (x, a, b, m), refs, strict=True):
        if t.requires_grad:
            close(t.grad, ref.grad, torch.float32, name)
        else:
            assert t.grad is None


def test_fused_dora_zero_tokens(backend: str, pinned_seed: None) -> None:
    """An empty batch (no tokens), with and without dropout: empty output, zero gradients, no error."""
    for p in (0.0, 0.25):
        x = torch.randn(0, 3, 16, requires_grad=True)
        a, b = torch.randn(2, 16, requires_grad=True), torch.randn(8, 2, requires_grad=True)
        m = torch.rand(8, requires_grad=True)
        y = fused_dora(x, torch.randn(8, 16), a, b, m, 2.0, torch.randn(8), dropout=p)
        assert y.shape == (0, 3, 8)
        y.sum().backward()
        assert x.grad.shape == x.shape
        for t in (a, b, m):
            assert t.grad is not None and not t.grad.abs().any()


def test_fused_dora_dropout_is_off_in_eval_and_bf16_close(backend: str, pinned_seed: None) -> None:
    """bf16 with dropout (training) against the fp32 formula with the same mask; eval mode means no mask at all."""
    torch.manual_seed(6)
    layer = make_dora(k=32, n=12, dtype=torch.bfloat16)
    layer.lora_dropout = nn.Dropout(0.4)
    fused(layer)
    x = torch.randn(9, 32).to(torch.bfloat16)
    got = layer(x)
    mask = plain_mask(9, 32, 0.4, torch.bfloat16).float()
    want = layer_reference(layer, x.float(), mask)
    close(got, want, torch.bfloat16, "train forward", low_tol=4e-2)
    layer.eval()
    close(layer(x), layer_reference(layer, x.float()), torch.bfloat16, "eval forward", low_tol=4e-2)


# ------------------------------------------------------------------------------------------- fused DoRA: norm cache
def test_row_norm_cache_follows_ordinary_weight_changes() -> None:
    """In-place ops, a replaced Parameter, merge/unmerge, and new tensors (likely at a freed tensor's address)."""
    layer = fused(make_dora(seed=1))
    x = torch.randn(4, 24)
    layer(x)
    with torch.no_grad():
        layer.base_layer.weight.mul_(1.5)  # in place: the version counter moves
    close(layer(x), layer_reference(layer, x), torch.float32, "after mul_")
    layer.base_layer.weight = nn.Parameter(torch.randn(18, 24), requires_grad=False)
    close(layer(x), layer_reference(layer, x), torch.float32, "after a new Parameter")
    want = layer(x).detach()
    layer.merge()
    layer.unmerge()
    close(layer(x), want, torch.float32, "after merge and unmerge", fp32_tol=1e-5)
    a, b = torch.randn(2, 16), torch.randn(10, 2)
    with torch.no_grad():
        for i in range(12):  # freed and re-allocated tensors of one shape: ids are reused
            w = torch.randn(10, 16) * (i + 1)
            got = fused_dora(torch.eye(16), w, a, b, torch.ones(10), 0.5)
            want = dora_reference(torch.eye(16), w, None, a, b, torch.ones(10), 0.5)
            close(got, want, torch.float32, f"fresh weight {i}")
            del w, got


def test_row_norm_cache_sees_in_place_change_through_data() -> None:
    layer = fused(make_dora(seed=2))
    x = torch.randn(4, 24)
    layer(x)
    layer.base_layer.weight.data.mul_(2.0)
    close(layer(x), layer_reference(layer, x), torch.float32, "after weight.data.mul_")


def test_row_norm_cache_sees_data_reassignment() -> None:
    layer = fused(make_dora(seed=3))
    x = torch.randn(4, 24)
    layer(x)
    layer.base_layer.weight.data = torch.randn(18, 24) * 3
    close(layer(x), layer_reference(layer, x), torch.float32, "after weight.data = ...")


def test_fused_dora_under_inference_mode_with_autocast() -> None:
    layer = fused(make_dora(seed=4))
    x = torch.randn(5, 24)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x)
    close(got, layer_reference(layer, x).detach(), torch.bfloat16, "inference_mode + autocast", low_tol=4e-2)


def test_row_norm_cache_does_not_block_swapping_the_weight() -> None:
    layer = fused(make_dora(seed=5))
    x = torch.randn(4, 24)
    with torch.no_grad():
        layer(x)
    new = {"weight": torch.randn(18, 24), "bias": torch.randn(18)}
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        layer.base_layer.load_state_dict(new)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)
    close(layer(x), layer_reference(layer, x), torch.float32, "after a swapped-in weight")


def test_fused_dora_in_float64() -> None:
    layer = fused(make_dora(seed=6).double())
    x = torch.randn(4, 24, dtype=torch.float64)
    got = layer(x)
    base = layer.base_layer
    a, b, m = (t.detach() for t in layer_params(layer))
    want = dora_reference(x, base.weight, base.bias, a, b, m, layer.scaling)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)  # the norm is documented as fp32


# ------------------------------------------------------------------------------------ fused DoRA: models, PEFT, fit
def dora_model(seed: int = 0) -> nn.Module:
    model = tiny_model("llama", seed)
    inject_adapters(model, LoRAConfig(r=4, alpha=8, use_dora=True))
    gen = torch.Generator().manual_seed(seed + 11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * (0.05 if "magnitude" not in name else 0.2))
    return model


def test_adapter_loaded_into_a_fused_dora_model_and_unfuse(tmp_path: Any) -> None:
    """A PEFT file written from an unfused DoRA model loads into a fused one: same logits; unfuse gives DoRALinear."""
    source = dora_model()
    ids = token_batch()
    save_adapter(source, tmp_path)
    target = copy.deepcopy(source)
    with torch.no_grad():
        for m in target.modules():
            if isinstance(m, DoRALinear):
                m.lora_B.weight.zero_()
    keys = sorted(target.state_dict())
    fuse_lora_layers(target, warn=False)
    assert sorted(target.state_dict()) == keys
    load_adapter(target, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(target(input_ids=ids).logits, source(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert unfuse_lora_layers(target) == 14
    assert all(type(m) is DoRALinear for m in target.modules() if isinstance(m, LoRALinear))
    assert sorted(target.state_dict()) == keys


def test_save_adapter_from_a_fused_dora_model(tmp_path: Any) -> None:
    model = dora_model(seed=1)
    ids = token_batch()
    fuse_lora_layers(model, warn=False)
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    fresh = tiny_model("llama", 1)
    load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def fit(tmp_path: Any, callbacks: list, arch: str = "llama") -> TinyLM:
    module = TinyLM(arch=arch, lr=5e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(tmp_path, callbacks, max_steps=3).fit(module)
    return module


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_trainer_fit_dora_with_and_without_fused_kernels(tmp_path: Any, arch: str) -> None:
    """The DoRA callback with FusedKernels trains like without it (Linear and Conv1D bases); fit ends unfused."""
    plain = fit(tmp_path / "plain", [DoRA(r=4, alpha=8)], arch)
    kernels = FusedKernels(**NO_LIGER)
    fused_run = fit(tmp_path / "fused", [DoRA(r=4, alpha=8), kernels], arch)
    assert len(kernels.applied["lora"]) > 0
    assert fused_run.losses == pytest.approx(plain.losses, rel=1e-5, abs=1e-6)
    want = {n: p for n, p in plain.named_parameters() if p.requires_grad}
    got = {n: p for n, p in fused_run.named_parameters() if p.requires_grad}
    assert sorted(got) == sorted(want) and any("magnitude" in n for n in got)
    for name, p in want.items():
        torch.testing.assert_close(got[name], p, rtol=1e-4, atol=1e-5, msg=name)
    assert not any(isinstance(m, FusedDoRALinear) for m in fused_run.modules())


def test_trainer_save_adapter_with_fused_dora(tmp_path: Any) -> None:
    fit(tmp_path, [DoRA(r=4, alpha=8), FusedKernels(**NO_LIGER), SaveAdapter("adapter")])
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] is True


def test_fused_cross_entropy_is_not_applied_to_a_dora_head() -> None:
    """The fused cross-entropy computes ``head(x)`` as plain LoRA; a DoRA head (magnitude, norm) keeps the model's own
    loss, and the warning says why."""
    from lightning_zenft.fusion import apply_liger, restore_liger

    model = tiny_model("llama")
    for p in model.parameters():
        p.requires_grad_(False)
    model.lm_head = DoRALinear(model.lm_head, r=2, alpha=4)
    with pytest.warns(UserWarning, match="output head is a DoRALinear"):
        patches = apply_liger(model, rms_norm=False, rope=False, fused_linear_cross_entropy=True)
    try:
        assert not patches.forwards and "forward" not in model.__dict__
    finally:
        restore_liger(patches)


# -------------------------------------------------------------------------------------------- matmul: TMA and auto
def plain_matmul(x: torch.Tensor, w: torch.Tensor, p: Any, q: Any, bias: Any, c0: Any) -> torch.Tensor:
    out = x.double() @ w.double()
    for extra in (None if p is None else p.double() @ q.double(), bias, c0):
        if extra is not None:
            out = out + extra.double()
    return out


TMA_CASES = [  # (dtype, M, K, N, weight layout, R, bias, c0)
    (torch.float32, 5, 16, 8, "nk", 0, False, False),
    (torch.float32, 33, 40, 24, "kn", 3, True, True),
    (torch.float32, 17, 32, 48, "nk", 70, True, False),  # R over BLOCK_R=64: two epilogue passes
    (torch.bfloat16, 19, 24, 40, "nk", 5, False, True),
    (torch.bfloat16, 16, 32, 16, "kn", 20, True, True),
]


@needs_interpreter
@pytest.mark.parametrize("case", TMA_CASES, ids=lambda c: f"{str(c[0])[6:]}-{c[1]}x{c[2]}x{c[3]}-{c[4]}-r{c[5]}")
def test_tma_gemm_matches_plain_product(triton_on: None, restore_backend: None, case: tuple) -> None:
    dtype, m, k, n, layout, r, with_bias, with_c0 = case
    torch.manual_seed(7)
    x = torch.randn(m, k).to(dtype)
    w = torch.randn(k, n).to(dtype) if layout == "kn" else torch.randn(n, k).to(dtype).t()
    p = torch.randn(m, r).to(dtype) if r else None
    q = torch.randn(n, r).to(dtype).t() if r else None  # a transposed view, as (s B)^T is
    bias = torch.randn(n).to(dtype) if with_bias else None
    c0 = torch.randn(m, n).to(dtype) if with_c0 else None
    assert triton_module("_matmul_triton").tma_compatible(x, w)
    set_matmul_backend("triton-tma")
    assert mm._choose(x, w, p, q, bias, c0, default_runtime()) == "tma"
    got = lowrank_matmul(x, w, p, q, bias, None if c0 is None else c0.clone())
    want = plain_matmul(x, w, p, q, bias, c0)
    assert got.dtype == dtype and got.shape == (m, n)
    close(got, want, dtype, "tma product", fp32_tol=1e-5)


@needs_interpreter
def test_tma_ignores_padding_of_strided_operands(triton_on: None, restore_backend: None) -> None:
    """Row-padded views (16-byte strides, aligned): the descriptor's shape, not the padding, bounds the tiles."""
    set_matmul_backend("triton-tma")
    torch.manual_seed(8)
    big_x, big_w = torch.randn(24, 32) * 100, torch.randn(24, 32) * 100
    x, w = big_x[:20, :20], big_w[:20, :20].t()
    assert triton_module("_matmul_triton").tma_compatible(x, w)
    close(lowrank_matmul(x, w), plain_matmul(x, w, None, None, None, None), torch.float32, "padded views")


@needs_interpreter
def test_tma_falls_back_for_incompatible_operands(triton_on: None, restore_backend: None) -> None:
    """Misaligned base, odd row stride, non-unit last stride: ``triton-tma`` runs the plain Triton GEMM instead."""
    set_matmul_backend("triton-tma")
    tma_compatible = triton_module("_matmul_triton").tma_compatible
    torch.manual_seed(9)
    cases = {
        "x 4 bytes off": (torch.randn(8, 17)[:, 1:], torch.randn(16, 16).t()),
        "x rows of 20 bytes": (torch.randn(8, 5), torch.randn(16, 5).t()),
        "x column-major": (torch.randn(16, 8).t(), torch.randn(16, 16).t()),
        "w rows of 68 bytes": (torch.randn(8, 16), torch.randn(16, 17)[:, 1:]),
    }
    for what, (x, w) in cases.items():
        assert not tma_compatible(x, w), what
        assert mm._choose(x, w, None, None, None, None, default_runtime()) == "triton", what
        close(lowrank_matmul(x, w), plain_matmul(x, w, None, None, None, None), torch.float32, what)


@needs_interpreter
def test_tma_with_no_tokens(triton_on: None, restore_backend: None) -> None:
    set_matmul_backend("triton-tma")
    w, bias = torch.randn(16, 16).t(), torch.randn(16)
    out = lowrank_matmul(torch.randn(0, 16), w, torch.randn(0, 2), torch.randn(2, 16), bias)
    assert out.shape == (0, 16)


def test_set_matmul_backend_validates_and_resets_choices(restore_backend: None) -> None:
    for bad in ("TRITON", "tma", "cublas", ""):
        with pytest.raises(ValueError, match="is not one of"):
            set_matmul_backend(bad)  # type: ignore[arg-type]
    assert default_runtime().backend == "auto"
    default_runtime().choices[("stale",)] = "tma"
    set_matmul_backend("triton-tma")
    assert default_runtime().backend == "triton-tma" and not default_runtime().choices


@pytest.fixture
def fake_cuda_auto(monkeypatch: pytest.MonkeyPatch, triton_on: None, restore_backend: None) -> list[str]:
    """``auto`` as on an sm90 GPU, on CPU tensors: the interpreter runs the kernels and timings are scripted.

    Timings are handed out in candidate order (torch, triton, tma): TMA is the fastest. Returns the timed names.
    """
    if torch.cuda.is_available() or not interpret_mode():
        pytest.skip("drives auto's timing path with the interpreter on CPU")
    monkeypatch.setattr(mm, "interpret_mode", lambda: False)  # only the matmul module's view of it
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (9, 0))
    monkeypatch.setattr(default_runtime(), "tma_failed", [])
    timed: list[str] = []
    scripted = {0: 3.0, 1: 2.0, 2: 1.0}

    def fake_time(fn: Callable[[], object], reps: int = 5) -> float:
        fn()
        timed.append(str(len(timed) % 3))
        return scripted[(len(timed) - 1) % 3]

    monkeypatch.setattr(mm, "_time_ms", fake_time)
    set_matmul_backend("auto")
    return timed


def test_fastest_drops_a_failing_tma_candidate(fake_cuda_auto: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A TMA build that raises is dropped for good with one warning; any other candidate's error propagates."""
    ran: list[str] = []
    times = {"torch": 2.0, "triton": 1.0}

    def candidate(name: str) -> Callable[[], None]:
        def fn() -> None:
            ran.append(name)
            if name == "tma":
                raise RuntimeError("no TMA here")
            if name == "broken":
                raise ValueError("a real bug")

        fn.__name__ = name
        return fn

    monkeypatch.setattr(mm, "_time_ms", lambda fn, reps=5: (fn(), times.get(fn.__name__, 0.5))[1])
    rt = default_runtime()
    with pytest.warns(UserWarning, match="TMA GEMM failed here"):
        choice = mm._fastest(("k",), {n: candidate(n) for n in ("torch", "triton", "tma")}, rt)
    assert choice == "triton" and rt.choices[("k",)] == "triton" and ran == ["torch", "triton", "tma"]
    assert rt.tma_failed and not mm._tma_eligible(torch.randn(16, 16), torch.randn(16, 16), rt)
    assert mm._fastest(("k",), {}, rt) == "triton"  # cached: nothing timed again
    with pytest.raises(ValueError, match="a real bug"):
        mm._fastest(("k2",), {"torch": candidate("torch"), "broken": candidate("broken")}, rt)


def test_auto_times_three_back_ends_once_per_shape(fake_cuda_auto: list[str]) -> None:
    torch.manual_seed(10)
    x, w = torch.randn(32, 16), torch.randn(16, 16).t()
    assert mm._choose(x, w, None, None, None, None, default_runtime()) == "tma"
    assert len(fake_cuda_auto) == 3
    close(lowrank_matmul(x, w), plain_matmul(x, w, None, None, None, None), torch.float32, "auto -> tma")
    assert len(fake_cuda_auto) == 3  # cached: no second timing for the same shape


def test_auto_does_not_reuse_tma_for_an_incompatible_operand(fake_cuda_auto: list[str]) -> None:
    torch.manual_seed(11)
    w = torch.randn(16, 16).t()
    assert mm._choose(torch.randn(32, 16), w, None, None, None, None, default_runtime()) == "tma"
    x = torch.randn(32, 17)[:, 1:]  # same shape and layout key, base 4 bytes off
    assert not triton_module("_matmul_triton").tma_compatible(x, w)
    close(lowrank_matmul(x, w), plain_matmul(x, w, None, None, None, None), torch.float32, "misaligned x")


def test_auto_does_not_copy_the_accumulator_once_chosen(fake_cuda_auto: list[str]) -> None:
    x, w, c0 = torch.randn(32, 16), torch.randn(16, 16).t(), torch.randn(32, 16)
    mm._choose(x, w, None, None, None, c0, default_runtime())  # times once
    ops = counted_ops(lambda: mm._choose(x, w, None, None, None, c0, default_runtime()))
    assert "aten.clone.default" not in ops, ops


# ---------------------------------------------------------------------------------------------------- dual_lowrank
DUAL_CASES = [  # (dtype, M, N, R)
    (torch.float32, 1, 1, 1),
    (torch.float32, 17, 33, 5),
    (torch.float32, 40, 70, 20),  # R > 16: BLOCK_R 32
    (torch.float32, 20, 18, 70),  # R > 64
    (torch.bfloat16, 23, 37, 9),
    (torch.float32, 0, 5, 3),
    (torch.float32, 6, 0, 3),
]


@pytest.mark.parametrize("case", DUAL_CASES, ids=lambda c: f"{str(c[0])[6:]}-{c[1]}x{c[2]}-r{c[3]}")
def test_dual_lowrank_strided_inputs(backend: str, case: tuple) -> None:
    """Transposed dy and b, xa a column slice of a concatenation (what the shared-group split produces)."""
    dtype, m, n, r = case
    torch.manual_seed(12)
    dy = torch.randn(n, m).to(dtype).t()
    b = torch.randn(r, n).to(dtype).t()
    xa = torch.randn(m, r + 3).to(dtype).split([3, r], dim=1)[1]
    p, g = dual_lowrank(dy, b, xa)
    assert p.shape == (m, r) and g.shape == (n, r) and p.dtype == g.dtype == dtype
    if m and n:
        close(p, dy.double() @ b.double(), dtype, "dy @ b", fp32_tol=1e-5)
        close(g, dy.double().t() @ xa.double(), dtype, "dy^T @ xa", fp32_tol=1e-5)
    else:
        assert not p.abs().any() and not g.abs().any()


@pytest.mark.parametrize("split", [1, 2, 3, 7, 50])
def test_dual_lowrank_column_splits(triton_on: None, split: int) -> None:
    """Any number of column ranges (more than there are column blocks too) sums to the same products."""
    torch.manual_seed(13)
    dy, b, xa = torch.randn(20, 50), torch.randn(50, 4), torch.randn(20, 4)
    p, g = triton_module("_dual_triton").dual_lowrank_triton(dy, b, xa, split=split)
    close(p, dy.double() @ b.double(), torch.float32, "p", fp32_tol=1e-5)
    close(g, dy.double().t() @ xa.double(), torch.float32, "g", fp32_tol=1e-5)


def test_dual_lowrank_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="dual_lowrank needs"):
        dual_lowrank(torch.randn(4, 6), torch.randn(5, 2), torch.randn(4, 2))
    with pytest.raises(ValueError, match="dual_lowrank needs"):
        dual_lowrank(torch.randn(4, 6), torch.randn(6, 2), torch.randn(3, 2))


# ---------------------------------------------------------------------------------------------- group and MLP grads
def group_leaves(seed: int, n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    torch.manual_seed(seed)
    return [
        (torch.randn(8, 12), torch.randn(8).requires_grad_(), torch.randn(2, 12).requires_grad_(), torch.randn(8, 2))
        for _ in range(n)
    ]


def plain_lora(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w, bias) + 2.0 * F.linear(F.linear(x, a), b)


def test_group_outputs_used_by_separate_backwards(backend: str) -> None:
    """Outputs used one at a time through retain_graph: gradients accumulate as plain autograd's; never-used None."""
    leaves = group_leaves(14)
    for _, _, _, b in leaves:
        b.requires_grad_()
    x = torch.randn(5, 12, requires_grad=True)
    outs = fused_lora_group(x, [LoRAProjection(w, bias, a, b, 2.0) for w, bias, a, b in leaves])
    refs = [tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in leaf) for leaf in leaves]
    xr = x.detach().clone().requires_grad_()
    want = [plain_lora(xr, *leaf) for leaf in refs]
    for got_out, want_out, keep in ((outs[0], want[0], True), (outs[1], want[1], True), (outs[0], want[0], False)):
        got_out.square().sum().backward(retain_graph=keep)
        want_out.square().sum().backward(retain_graph=keep)
    close(x.grad, xr.grad, torch.float32, "dx")
    for i, (leaf, ref) in enumerate(zip(leaves, refs, strict=True)):
        for t, r in zip(leaf[1:], ref[1:], strict=True):
            if i == 2:
                assert t.grad is None, "a never-used output's adapter got a gradient"
            else:
                close(t.grad, r.grad, torch.float32, f"member {i}")


def test_group_under_checkpoint_with_an_unused_output(backend: str) -> None:
    """Non-reentrant checkpoint; one returned output unused: its adapter gets None, the others plain gradients."""
    leaves = group_leaves(15)
    for _, _, _, b in leaves:
        b.requires_grad_()
    x = torch.randn(6, 12, requires_grad=True)

    def run(inp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outs = fused_lora_group(inp, [LoRAProjection(w, bias, a, b, 2.0) for w, bias, a, b in leaves])
        return outs[0], outs[2]

    first, _unused = checkpoint(run, x, use_reentrant=False)
    first.sum().backward()
    xr = x.detach().clone().requires_grad_()
    ref = [t.detach().clone().requires_grad_(t.requires_grad) for t in leaves[0]]
    plain_lora(xr, *ref).sum().backward()
    close(x.grad, xr.grad, torch.float32, "dx")
    for t, r in zip(leaves[0][1:], ref[1:], strict=True):
        close(t.grad, r.grad, torch.float32, "used member")
    for leaf in leaves[1:]:
        assert all(t.grad is None for t in leaf[1:])


class DropGrad(torch.autograd.Function):
    """Uses a tensor in the graph but sends it no gradient (None), as a non-differentiable consumer does."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor) -> torch.Tensor:
        return t.new_ones(())

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> None:
        return None


def test_group_all_outputs_unused_gives_no_gradients(backend: str) -> None:
    """Every output reaches the loss without a gradient: the group's backward gives x and every adapter None."""
    leaves = group_leaves(16)
    for _, _, _, b in leaves:
        b.requires_grad_()
    x = torch.randn(4, 12, requires_grad=True)
    outs = fused_lora_group(x, [LoRAProjection(w, bias, a, b, 2.0) for w, bias, a, b in leaves])
    loss = sum(DropGrad.apply(o) for o in outs) + (x * 3).sum()
    loss.backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 3.0))
    assert all(t.grad is None for leaf in leaves for t in leaf)


MLP_GRADS = [  # which of (x, gate/up adapters, down A, down B, down bias) require grad
    (False, False, True, True, False),
    (False, False, False, True, True),
    (False, False, False, False, True),
    (True, False, False, False, False),
    (False, True, False, False, False),
]


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("grads", MLP_GRADS, ids=lambda g: "".join("1" if v else "0" for v in g))
def test_fused_mlp_requires_grad_combinations(pinned_seed: None, grads: tuple, recompute: bool) -> None:
    """The early stop at the down projection (need_gu) and recompute_hidden against plain autograd; dropout on down."""
    x_grad, gu_grad, da_grad, db_grad, bias_grad = grads
    torch.manual_seed(17)
    h, i, r, s, p = 16, 24, 3, 1.5, 0.3
    x = torch.randn(7, h).requires_grad_(x_grad)
    wg, wu, wd = torch.randn(i, h) * 0.3, torch.randn(i, h) * 0.3, torch.randn(h, i) * 0.3
    ag, bg, au, bu = (torch.randn(*shape) * 0.3 for shape in ((r, h), (i, r), (r, h), (i, r)))
    for t in (ag, bg, au, bu):
        t.requires_grad_(gu_grad)
    ad, bd = (torch.randn(r, i) * 0.3).requires_grad_(da_grad), (torch.randn(h, r) * 0.3).requires_grad_(db_grad)
    bias_d = torch.randn(h).requires_grad_(bias_grad)
    y = fused_lora_mlp(
        x,
        LoRAProjection(wg, None, ag, bg, s),
        LoRAProjection(wu, None, au, bu, s),
        LoRAProjection(wd, bias_d, ad, bd, s, p),
        "silu",
        True,
        recompute,
    )
    leaves = (x, ag, bg, au, bu, ad, bd, bias_d)
    xr, agr, bgr, aur, bur, adr, bdr, biasr = (t.detach().clone().requires_grad_(t.requires_grad) for t in leaves)
    gate = F.linear(xr, wg) + s * F.linear(F.linear(xr, agr), bgr)
    up = F.linear(xr, wu) + s * F.linear(F.linear(xr, aur), bur)
    hidden = F.silu(gate) * up
    want = F.linear(hidden, wd, biasr) + s * F.linear(F.linear(hidden * plain_mask(7, i, p, torch.float32), adr), bdr)
    close(y, want, torch.float32, "forward")
    dy = torch.randn_like(want)
    y.backward(dy)
    want.backward(dy)
    refs = (xr, agr, bgr, aur, bur, adr, bdr, biasr)
    for name, t, r_ in zip("x ag bg au bu ad bd bias".split(), leaves, refs, strict=True):
        if t.requires_grad:
            close(t.grad, r_.grad, torch.float32, name)
        else:
            assert t.grad is None, name


# --------------------------------------------------------------------------------- LoRALinear's read-only weight/bias
def test_lora_weight_property_is_not_a_parameter_anywhere() -> None:
    """Counting, trainability, state_dict keys, re-injection and merge see one base weight, under base_layer."""
    model = tiny_model("llama")
    total = sum(p.numel() for p in model.parameters())
    inject_adapters(model, LoRAConfig(r=4, alpha=8, bias="all"))
    adapters = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert len(adapters) == 14
    trainable, counted = count_parameters(model)
    lora = sum(m.lora_A.weight.numel() + m.lora_B.weight.numel() for _, m in adapters)
    assert counted == total + lora and trainable == lora  # llama's linears have no bias
    keys = model.state_dict().keys()
    for name, layer in adapters:
        assert layer.weight is layer.base_layer.weight and layer.bias is None
        assert f"{name}.weight" not in keys and f"{name}.base_layer.weight" in keys
        assert "weight" not in dict(layer.named_parameters(recurse=False))
    with pytest.raises(ValueError, match="matches no linear layer"):  # no LoRALinear taken for an nn.Linear
        inject_adapters(model, LoRAConfig(r=2, target_modules=["q_proj"]))
    layer = adapters[0][1]
    nn.init.normal_(layer.lora_B.weight)
    before = layer.base_layer.weight.detach().clone()
    delta = layer.scaling * layer.lora_B.weight.detach() @ layer.lora_A.weight.detach()
    layer.merge()
    torch.testing.assert_close(layer.weight, before + delta)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, before, rtol=1e-5, atol=1e-6)


def test_lora_layers_are_not_taken_for_norms_or_counted_twice() -> None:
    from lightning_zenft.fusion.liger import _rms_norm_kind

    head = LoRALinear(nn.Linear(8, 8), r=2, alpha=4)
    assert _rms_norm_kind(head) is None
    model = tiny_model("llama")
    inject_adapters(model, LoRAConfig(r=2, alpha=4, target_modules=["lm_head", "q_proj"]))
    assert isinstance(model.get_output_embeddings(), LoRALinear)
    trainable, _ = count_parameters(model)
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


def test_tie_weights_with_a_lora_on_a_tied_head() -> None:
    model = tiny_model("gemma")  # ties lm_head to the input embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    inject_adapters(model, LoRAConfig(r=2, alpha=4, target_modules=["lm_head"]))
    model.tie_weights()
    assert model.lm_head.base_layer.weight is model.model.embed_tokens.weight

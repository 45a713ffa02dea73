"""Edge cases of the fused LoRA kernels against independent plain-PyTorch references.

Complements ``test_fused_lora_parity.py`` and ``test_nf4_glu_kernels.py``: dropout on each MLP projection and on all
three, every GLU activation, per-projection ranks/scales/biases, gradients requested for only some inputs, NF4 bases
(ours and bitsandbytes') inside groups and MLPs, eval mode, autocast, repeated backward, non-contiguous and
degenerate shapes, and the Triton GEMM across several tile groups. References use ``F.linear`` / ``F.silu`` /
``F.gelu`` and explicit masks; the masks come from :func:`dropout_mask` with the plan's seeds (the same RNG state
replayed), as in the existing dropout test.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
import torch.nn.functional as F
from zenft_testing import close, leaf, ref_copy

from lightning_zenft.kernels import (
    LoRAProjection,
    NF4Weight,
    dropout_mask,
    fused_lora,
    fused_lora_group,
    fused_lora_mlp,
    lowrank_matmul,
    quantize_nf4,
)
from lightning_zenft.kernels.lora import ProjectionPlan
from lightning_zenft.kernels.nf4 import NF4_CODE

F32, BF16 = torch.float32, torch.bfloat16


# ------------------------------------------------------------------------------------------------------------ helpers


def ref_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    s: float,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x W^T + bias + s (mask * x) A^T B^T`` with torch's own ops (autograd gives every gradient)."""
    xd = x if mask is None else x * mask
    return F.linear(x, w, bias) + F.linear(F.linear(xd, a), b) * s


def ref_act(g: torch.Tensor, act: str) -> torch.Tensor:
    if act == "silu":
        return F.silu(g)
    if act == "gelu_tanh":
        return F.gelu(g, approximate="tanh")
    assert act == "gelu"
    return F.gelu(g)


def replay_masks(
    state: torch.Tensor, groups: Sequence[Sequence[LoRAProjection]], m: int, dtype: torch.dtype
) -> list[torch.Tensor | None]:
    """The dropout multipliers the kernel drew: replay the RNG state, rebuild the plans in call order, regenerate.

    One ``(m, in_features)`` multiplier per projection with dropout (None otherwise), in the order of ``groups``.
    """
    torch.set_rng_state(state)
    masks: list[torch.Tensor | None] = []
    for projections in groups:
        plan = ProjectionPlan(projections, training=True)
        for p, d, seed in zip(projections, plan.dropouts, plan.seeds, strict=True):
            if d == 0.0:
                masks.append(None)
                continue
            mask = dropout_mask(torch.Size((m, p.lora_a.shape[1])), d, seed, torch.device("cpu"), dtype).float()
            dropped = (mask == 0).sum().item()
            assert 0 < dropped < mask.numel(), "the mask must drop some but not all of the inputs"
            masks.append(mask)
    return masks


def shaped(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    return None if mask is None else mask.view(*like.shape[:-1], mask.shape[-1])


class MLPCase:
    """Random gate/up/down LoRA projections plus an independent reference of the gated MLP."""

    def __init__(
        self,
        hidden: int,
        inter: int,
        dtype: torch.dtype,
        ranks: Sequence[int] = (2, 5, 3),
        scalings: Sequence[float] = (0.5, 2.0, -1.25),
        dropouts: Sequence[float] = (0.0, 0.0, 0.0),
        bias_modes: Sequence[str] = ("trainable", "frozen", "trainable"),
        train_a: Sequence[bool] = (True, True, True),
        train_b: Sequence[bool] = (True, True, True),
        weights: Sequence[torch.Tensor | NF4Weight] | None = None,
        ref_weights: Sequence[torch.Tensor] | None = None,
    ) -> None:
        shapes = [(inter, hidden), (inter, hidden), (hidden, inter)]
        if weights is None:
            weights = [leaf(*s, dtype=dtype, grad=False, scale=0.3) for s in shapes]
        self.ref_weights = [w.float() for w in weights] if ref_weights is None else list(ref_weights)
        self.a = [leaf(r, s[1], dtype=dtype, grad=t, scale=0.3) for r, s, t in zip(ranks, shapes, train_a, strict=True)]
        self.b = [leaf(s[0], r, dtype=dtype, grad=t, scale=0.3) for r, s, t in zip(ranks, shapes, train_b, strict=True)]
        self.bias = [
            None if mode == "none" else leaf(s[0], dtype=dtype, grad=mode == "trainable")
            for mode, s in zip(bias_modes, shapes, strict=True)
        ]
        self.scalings, self.dropouts = list(scalings), list(dropouts)
        self.projections = [
            LoRAProjection(weights[i], self.bias[i], self.a[i], self.b[i], scalings[i], dropouts[i]) for i in range(3)
        ]
        self.dtype = dtype

    def run(
        self, x: torch.Tensor, act: str, training: bool = True, recompute: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """The fused output and the multipliers it used (all None without dropout)."""
        state = torch.get_rng_state()
        y = fused_lora_mlp(x, *self.projections, act=act, training=training, recompute_hidden=recompute)
        after = torch.get_rng_state()
        m = x.numel() // x.shape[-1]
        if training and any(self.dropouts):
            masks = replay_masks(state, [self.projections[:2], self.projections[2:]], m, self.dtype)
        else:
            masks = [None, None, None]
        torch.set_rng_state(after)
        return y, masks

    def reference(self, x: torch.Tensor, act: str, masks: Sequence[torch.Tensor | None]) -> tuple[torch.Tensor, ...]:
        """``(y, xr, a_refs, b_refs, bias_refs)``: the fp32 reference output and its leaves."""
        xr = ref_copy(x)
        ar, br, biasr = [ref_copy(t) for t in self.a], [ref_copy(t) for t in self.b], [ref_copy(t) for t in self.bias]
        w, s = self.ref_weights, self.scalings
        g = ref_linear(xr, w[0], ar[0], br[0], s[0], biasr[0], shaped(masks[0], xr))
        u = ref_linear(xr, w[1], ar[1], br[1], s[1], biasr[1], shaped(masks[1], xr))
        h = ref_act(g, act) * u
        y = ref_linear(h, w[2], ar[2], br[2], s[2], biasr[2], shaped(masks[2], h))
        return y, xr, ar, br, biasr

    def check_grads(self, x: torch.Tensor, xr: torch.Tensor, ar: list, br: list, biasr: list) -> None:
        """Every requested gradient matches the reference; every other one is None."""
        pairs = [(x, xr, "dx")]
        for i, name in enumerate(("gate", "up", "down")):
            pairs += [(self.a[i], ar[i], f"dA_{name}"), (self.b[i], br[i], f"dB_{name}")]
            if self.bias[i] is not None:
                pairs.append((self.bias[i], biasr[i], f"dbias_{name}"))
        for got, want, what in pairs:
            if got.requires_grad:
                close(got.grad, want.grad, self.dtype, what)
            else:
                assert got.grad is None, f"{what}: a gradient for an input that does not require one"
        for p in self.projections:
            if isinstance(p.weight, torch.Tensor):
                assert p.weight.grad is None, "the frozen base weight must get no gradient"


def nf4_unpack(nf4: NF4Weight) -> torch.Tensor:
    """Independent dequantization of single-level NF4 storage: high nibble first, one fp32 scale per block."""
    numel = nf4.shape[0] * nf4.shape[1]
    packed = nf4.packed.reshape(-1).long()
    codes = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)[:numel]
    levels = torch.tensor(NF4_CODE, dtype=torch.float32)
    scales = nf4.absmax.float().reshape(-1)[torch.arange(numel) // nf4.blocksize]
    return (levels[codes] * scales).view(nf4.shape)


def bnb_nf4(n: int, k: int, nested: bool, dtype: torch.dtype) -> tuple[NF4Weight, torch.Tensor]:
    """A bitsandbytes ``Params4bit`` quantized on CPU, read by ``NF4Weight.from_bnb``, and bitsandbytes' dequant."""
    bnb = pytest.importorskip("bitsandbytes")
    param = bnb.nn.Params4bit(
        data=torch.randn(n, k) * 0.3, requires_grad=False, quant_type="nf4", compress_statistics=nested, blocksize=64
    ).to("cpu")
    if getattr(param, "quant_state", None) is None:
        pytest.skip("this bitsandbytes build does not quantize on CPU")
    dense = bnb.functional.dequantize_4bit(param.data, param.quant_state).float()
    return NF4Weight.from_bnb(param, dtype=dtype), dense


# ----------------------------------------------------------------------------------------------------------- MLP
@pytest.mark.parametrize(
    ("dropouts", "act", "recompute"),
    [
        ((0.4, 0.0, 0.0), "silu", False),
        ((0.0, 0.4, 0.0), "gelu", True),
        ((0.0, 0.0, 0.4), "gelu_tanh", False),
        ((0.0, 0.0, 0.4), "silu", True),
        ((0.3, 0.5, 0.2), "silu", False),
        ((0.3, 0.5, 0.2), "gelu", True),
        ((0.3, 0.5, 0.0), "gelu_tanh", False),
    ],
    ids=str,
)
def test_mlp_dropout_on_each_projection(backend: str, dropouts: tuple, act: str, recompute: bool) -> None:
    """Dropout on gate/up/down alone and together, per-projection ranks, scales (one negative) and bias modes;
    h kept for dA_down or recomputed."""
    torch.manual_seed(10)
    case = MLPCase(hidden=19, inter=23, dtype=F32, dropouts=dropouts)
    x = leaf(2, 3, 19, dtype=F32)
    y, masks = case.run(x, act, recompute=recompute)
    assert [m is not None for m in masks] == [d > 0 for d in dropouts]
    dy = torch.randn_like(y)
    y.backward(dy)
    yr, xr, ar, br, biasr = case.reference(x, act, masks)
    yr.backward(dy)
    close(y, yr, F32, "forward")
    case.check_grads(x, xr, ar, br, biasr)


@pytest.mark.parametrize("act", ["silu", "gelu"])
def test_mlp_bf16_single_token_dropout_everywhere(backend: str, act: str) -> None:
    """bf16, one token (M = 1), odd widths, dropout and a trainable bias on all three projections."""
    torch.manual_seed(11)
    case = MLPCase(
        hidden=17, inter=33, dtype=BF16, ranks=(4, 1, 8), dropouts=(0.5, 0.25, 0.5), bias_modes=("trainable",) * 3
    )
    x = leaf(1, 1, 17, dtype=BF16)
    y, masks = case.run(x, act)
    assert y.dtype == BF16 and y.shape == (1, 1, 17)
    dy = torch.randn_like(y)
    y.backward(dy)
    yr, xr, ar, br, biasr = case.reference(x, act, masks)
    yr.backward(dy.float())
    close(y, yr, BF16, "forward")
    case.check_grads(x, xr, ar, br, biasr)


PARTIAL_MLP = {
    "x_frozen": dict(x=False, train_a=(True,) * 3, train_b=(True,) * 3, bias=("trainable", "none", "frozen")),
    "x_frozen_recompute": dict(
        x=False, train_a=(True,) * 3, train_b=(True,) * 3, bias=("trainable", "none", "frozen"), recompute=True
    ),
    "all_A_frozen": dict(x=True, train_a=(False,) * 3, train_b=(True,) * 3, bias=("none", "trainable", "none")),
    "mixed": dict(x=False, train_a=(False, True, False), train_b=(True, False, True), bias=("frozen",) * 3),
    "down_only": dict(x=False, train_a=(False, False, True), train_b=(False, False, True), bias=("frozen",) * 3),
    "down_B_only_recompute": dict(
        x=False, train_a=(False,) * 3, train_b=(False, False, True), bias=("none",) * 3, recompute=True
    ),
    "biases_only": dict(x=False, train_a=(False,) * 3, train_b=(False,) * 3, bias=("trainable",) * 3),
    "x_only": dict(x=True, train_a=(False,) * 3, train_b=(False,) * 3, bias=("none",) * 3),
}


@pytest.mark.parametrize("which", list(PARTIAL_MLP))
def test_mlp_gradients_for_some_inputs_only(backend: str, which: str) -> None:
    """Only some of x, A, B, bias require grad (dropout on gate and down), h kept or recomputed: those match, the
    others stay None."""
    spec = PARTIAL_MLP[which]
    torch.manual_seed(12)
    case = MLPCase(
        hidden=18,
        inter=21,
        dtype=F32,
        dropouts=(0.5, 0.0, 0.3),
        bias_modes=spec["bias"],
        train_a=spec["train_a"],
        train_b=spec["train_b"],
    )
    x = leaf(5, 18, dtype=F32, grad=spec["x"])
    y, masks = case.run(x, "silu", recompute=spec.get("recompute", False))
    dy = torch.randn_like(y)
    y.backward(dy)
    yr, xr, ar, br, biasr = case.reference(x, "silu", masks)
    yr.backward(dy)
    close(y, yr, F32, "forward")
    case.check_grads(x, xr, ar, br, biasr)


def test_mlp_does_not_save_x_when_no_gate_or_up_lora_a_trains() -> None:
    """x is kept only for dA_gate / dA_up: with both frozen, nothing of shape (M, hidden) is saved."""
    torch.manual_seed(13)
    m, hidden, inter = 6, 8, 24
    case = MLPCase(hidden, inter, F32, ranks=(2, 2, 2), train_a=(False, False, True), bias_modes=("none",) * 3)
    x = leaf(m, hidden, dtype=F32)
    saved: list[torch.Size] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        y, _ = case.run(x, "silu")
    assert torch.Size([m, hidden]) not in saved
    y.sum().backward()  # and backward still works without it
    assert x.grad is not None and case.b[0].grad is not None and case.a[0].grad is None


def test_mlp_noncontiguous_input_weights_and_grad(backend: str) -> None:
    """A transposed 3-D input, transposed-view base weights (Conv1D layout), a transposed lora_A, a strided dy."""
    torch.manual_seed(14)
    hidden, inter = 17, 20
    weights = [torch.randn(s[1], s[0]).mul_(0.3).t() for s in [(inter, hidden), (inter, hidden), (hidden, inter)]]
    assert not weights[0].is_contiguous()
    case = MLPCase(hidden, inter, F32, weights=weights, dropouts=(0.0, 0.3, 0.0))
    case.a[1] = torch.randn(hidden, 5).mul_(0.3).t().requires_grad_()  # (r, in) view of an (in, r) tensor
    case.b[1] = leaf(inter, 5, dtype=F32, scale=0.3)
    case.projections[1] = LoRAProjection(weights[1], case.bias[1], case.a[1], case.b[1], 2.0, 0.3)
    x = leaf(4, 2, hidden, dtype=F32).transpose(0, 1)  # (2, 4, hidden), not contiguous
    x.retain_grad()
    y, masks = case.run(x, "gelu_tanh")
    t = torch.randn(4, 2, hidden)
    (y.transpose(0, 1) * t).sum().backward()  # dy = t.transpose(0, 1): not contiguous
    yr, xr, ar, br, biasr = case.reference(x, "gelu_tanh", masks)
    (yr.transpose(0, 1) * t).sum().backward()
    close(y, yr, F32, "forward")
    case.check_grads(x, xr, ar, br, biasr)


def test_mlp_one_dimensional_input_and_scalar_loss(backend: str) -> None:
    """x of shape (hidden,) (one token, no batch dim) and y.sum().backward() (an expanded, stride-0 dy)."""
    torch.manual_seed(15)
    case = MLPCase(hidden=9, inter=14, dtype=F32, dropouts=(0.0, 0.0, 0.5))
    x = leaf(9, dtype=F32)
    y, masks = case.run(x, "silu")
    assert y.shape == (9,)
    y.sum().backward()
    yr, xr, ar, br, biasr = case.reference(x, "silu", masks)
    yr.sum().backward()
    close(y, yr, F32, "forward")
    case.check_grads(x, xr, ar, br, biasr)


def test_mlp_zero_tokens(backend: str) -> None:
    """An empty batch (e.g. an expert that got no tokens): empty output, empty dx, zero parameter gradients."""
    torch.manual_seed(16)
    case = MLPCase(hidden=8, inter=12, dtype=F32, dropouts=(0.3, 0.0, 0.3))
    x = leaf(2, 0, 8, dtype=F32)
    y = fused_lora_mlp(x, *case.projections)
    assert y.shape == (2, 0, 8)
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == (2, 0, 8)
    for t in case.a + case.b + [case.bias[0], case.bias[2]]:
        assert t.grad is not None and t.grad.shape == t.shape and not t.grad.any()


# --------------------------------------------------------------------------------------------------------- group
def test_group_gradients_for_some_inputs_only(backend: str) -> None:
    """Group with dropout on member 0 (its A frozen), member 1's B frozen, only member 2's bias trains, x frozen."""
    torch.manual_seed(20)
    m, k, outs, ranks = 6, 19, [21, 9, 14], [3, 2, 4]
    x = leaf(m, k, dtype=F32, grad=False)
    ws = [leaf(n, k, dtype=F32, grad=False) for n in outs]
    a = [leaf(ranks[0], k, dtype=F32, grad=False), leaf(ranks[1], k, dtype=F32), leaf(ranks[2], k, dtype=F32)]
    b = [leaf(outs[0], ranks[0], dtype=F32), leaf(outs[1], ranks[1], dtype=F32, grad=False)]
    b.append(leaf(outs[2], ranks[2], dtype=F32, grad=False))
    biases = [leaf(outs[0], dtype=F32, grad=False), None, leaf(outs[2], dtype=F32)]
    drops = [0.5, 0.0, 0.0]
    projs = [LoRAProjection(ws[i], biases[i], a[i], b[i], 0.5 * (i + 1), drops[i]) for i in range(3)]
    state = torch.get_rng_state()
    ys = fused_lora_group(x, projs)
    masks = replay_masks(state, [projs], m, F32)
    dys = [torch.randn_like(y) for y in ys]
    torch.autograd.backward(ys, dys)
    refs = []
    for i in range(3):
        ar, br, biasr = ref_copy(a[i]), ref_copy(b[i]), ref_copy(biases[i])
        yr = ref_linear(x.float(), ws[i], ar, br, 0.5 * (i + 1), biasr, masks[i])
        yr.backward(dys[i])
        close(ys[i], yr, F32, f"y{i}")
        refs.append((ar, br, biasr))
    close(b[0].grad, refs[0][1].grad, F32, "dB0 (dropout member)")
    close(a[1].grad, refs[1][0].grad, F32, "dA1")
    close(a[2].grad, refs[2][0].grad, F32, "dA2")
    close(biases[2].grad, refs[2][2].grad, F32, "dbias2")
    assert x.grad is None and a[0].grad is None and b[1].grad is None and b[2].grad is None
    assert biases[0].grad is None and all(w.grad is None for w in ws)


@pytest.mark.parametrize("drops", [(0.0, 0.0, 0.0), (0.0, 0.4, 0.0)], ids=str)
def test_group_total_rank_beyond_one_triton_tile(backend: str, drops: tuple) -> None:
    """Three shared members of rank 24 (72 > 64, the Triton GEMM's largest rank tile: its rank loop runs twice), and
    20 tokens: two row blocks in every product of forward and backward."""
    torch.manual_seed(21)
    m, k, outs, r = 20, 18, [11, 7, 9], 24
    x = leaf(m, k, dtype=F32)
    ws = [leaf(n, k, dtype=F32, grad=False) for n in outs]
    a = [leaf(r, k, dtype=F32, scale=0.3) for _ in outs]
    b = [leaf(n, r, dtype=F32, scale=0.3) for n in outs]
    projs = [LoRAProjection(ws[i], None, a[i], b[i], 1.0 - 0.5 * i, drops[i]) for i in range(3)]
    state = torch.get_rng_state()
    ys = fused_lora_group(x, projs)
    masks = replay_masks(state, [projs], m, F32) if any(drops) else [None] * 3
    dys = [torch.randn_like(y) for y in ys]
    torch.autograd.backward(ys, dys)
    xr = ref_copy(x)
    for i in range(3):
        ar, br = ref_copy(a[i]), ref_copy(b[i])
        yr = ref_linear(xr, ws[i], ar, br, 1.0 - 0.5 * i, None, masks[i])
        yr.backward(dys[i])
        close(ys[i], yr, F32, f"y{i}")
        close(a[i].grad, ar.grad, F32, f"dA{i}")
        close(b[i].grad, br.grad, F32, f"dB{i}")
    close(x.grad, xr.grad, F32, "dx")


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_lowrank_matmul_several_tile_groups_and_rank_tiles(backend: str, dtype: torch.dtype) -> None:
    """M and N spanning several 16-wide tiles (and a GROUP_M group of one row), R = 70 > 64, bias and c0."""
    torch.manual_seed(22)
    m, k, n, r = 37, 20, 35, 70
    x, w = torch.randn(m, k).to(dtype), torch.randn(n, k).to(dtype)
    p, q = (torch.randn(m, r) * 0.3).to(dtype), (torch.randn(r, n) * 0.3).to(dtype)
    bias, c0 = torch.randn(n).to(dtype), torch.randn(m, n).to(dtype)
    want = c0.float() + x.float() @ w.float().t() + p.float() @ q.float() + bias.float()
    close(lowrank_matmul(x, w.t(), p, q, bias, c0.clone()), want, dtype, "c0 + x w + p q + b")


# --------------------------------------------------------------------------------------------------------- NF4
def test_quantize_nf4_picks_the_nearest_level_with_an_odd_blocksize() -> None:
    """Our quantizer, read back independently: every weight is the nearest NF4 level times its block's absmax."""
    torch.manual_seed(30)
    w = torch.randn(13, 11)  # 143 weights: odd, so the last byte holds one code
    nf4 = quantize_nf4(w, blocksize=48, dtype=F32)  # 3 blocks, the last one partial
    got = nf4_unpack(nf4)
    flat = w.reshape(-1)
    absmax = torch.stack([blk.abs().max() for blk in flat.split(48)])
    torch.testing.assert_close(nf4.absmax.float(), absmax)
    levels = torch.tensor(NF4_CODE) * absmax.repeat_interleave(48)[: flat.numel(), None]  # (numel, 16)
    nearest = levels.gather(1, (levels - flat[:, None]).abs().argmin(dim=1, keepdim=True)).squeeze(1)
    torch.testing.assert_close(got.reshape(-1), nearest, rtol=0, atol=1e-6)


@pytest.mark.parametrize("blocksize", [32, 48])
def test_nf4_dense_with_other_blocksizes(backend: str, blocksize: int) -> None:
    """``dense()`` (Triton or torch) against the independent unpacking, for a power-of-two and another blocksize."""
    torch.manual_seed(31)
    nf4 = quantize_nf4(torch.randn(9, 15), blocksize=blocksize, dtype=F32)
    torch.testing.assert_close(nf4.dense(), nf4_unpack(nf4), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_nf4_bases_in_a_group_with_dropout(backend: str, dtype: torch.dtype) -> None:
    """bitsandbytes NF4 (double-quantized) with dropout, our NF4 with a bias, and a dense weight, in one group."""
    torch.manual_seed(32)
    m, k, outs, r = 5, 33, [40, 17, 24], 3
    nf4_bnb, dense_bnb = bnb_nf4(outs[0], k, nested=True, dtype=dtype)
    nf4_ours = quantize_nf4(torch.randn(outs[1], k) * 0.3, dtype=dtype)
    dense = leaf(outs[2], k, dtype=dtype, grad=False, scale=0.3)
    weights: list[torch.Tensor | NF4Weight] = [nf4_bnb, nf4_ours, dense]
    ref_w = [dense_bnb, nf4_unpack(nf4_ours), dense.float()]
    x = leaf(2, m, k, dtype=dtype)
    a = [leaf(r, k, dtype=dtype, scale=0.3) for _ in outs]
    b = [leaf(n, r, dtype=dtype, scale=0.3) for n in outs]
    biases = [None, leaf(outs[1], dtype=dtype), None]
    drops = [0.5, 0.0, 0.0]
    projs = [LoRAProjection(weights[i], biases[i], a[i], b[i], 1.0 + i, drops[i]) for i in range(3)]
    state = torch.get_rng_state()
    ys = fused_lora_group(x, projs)
    masks = replay_masks(state, [projs], 2 * m, dtype)
    dys = [torch.randn_like(y) for y in ys]
    torch.autograd.backward(ys, dys)
    xr = ref_copy(x)
    for i in range(3):
        ar, br, biasr = ref_copy(a[i]), ref_copy(b[i]), ref_copy(biases[i])
        yr = ref_linear(xr, ref_w[i], ar, br, 1.0 + i, biasr, shaped(masks[i], xr))
        yr.backward(dys[i].float())
        close(ys[i], yr, dtype, f"y{i}")
        close(a[i].grad, ar.grad, dtype, f"dA{i}")
        close(b[i].grad, br.grad, dtype, f"dB{i}")
        if biasr is not None:
            close(biases[i].grad, biasr.grad, dtype, f"dbias{i}")
    close(x.grad, xr.grad, dtype, "dx")


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_nf4_bases_in_the_mlp(backend: str, dtype: torch.dtype) -> None:
    """All three MLP bases in NF4 (bitsandbytes plain and nested, ours), sharing the dequantization buffer."""
    torch.manual_seed(33)
    hidden, inter = 24, 40
    gate, gate_ref = bnb_nf4(inter, hidden, nested=False, dtype=dtype)
    up = quantize_nf4(torch.randn(inter, hidden) * 0.3, dtype=dtype)
    down, down_ref = bnb_nf4(hidden, inter, nested=True, dtype=dtype)
    case = MLPCase(
        hidden,
        inter,
        dtype,
        dropouts=(0.0, 0.3, 0.3),
        weights=[gate, up, down],
        ref_weights=[gate_ref, nf4_unpack(up), down_ref],
    )
    x = leaf(2, 3, hidden, dtype=dtype)
    y, masks = case.run(x, "silu")
    dy = torch.randn_like(y)
    y.backward(dy)
    yr, xr, ar, br, biasr = case.reference(x, "silu", masks)
    yr.backward(dy.float())
    close(y, yr, dtype, "forward")
    case.check_grads(x, xr, ar, br, biasr)


# ------------------------------------------------------------------------------------- modes, autocast, re-entry
def test_eval_mode_turns_dropout_off(backend: str) -> None:
    """training=False: the MLP and a group equal the no-dropout reference, forward and backward, on every call."""
    torch.manual_seed(40)
    case = MLPCase(hidden=10, inter=12, dtype=F32, dropouts=(0.5, 0.5, 0.5))
    x = leaf(3, 10, dtype=F32)
    y1, _ = case.run(x, "gelu", training=False)
    y2, _ = case.run(x, "gelu", training=False)
    assert torch.equal(y1, y2), "eval mode must be deterministic"
    dy = torch.randn_like(y1)
    y1.backward(dy)
    yr, xr, ar, br, biasr = case.reference(x, "gelu", [None, None, None])
    yr.backward(dy)
    close(y1, yr, F32, "forward (eval)")
    case.check_grads(x, xr, ar, br, biasr)

    w, a, b = leaf(6, 10, dtype=F32, grad=False), leaf(2, 10, dtype=F32), leaf(6, 2, dtype=F32)
    (q,) = fused_lora_group(x.detach(), [LoRAProjection(w, None, a, b, 1.5, 0.9)], training=False)
    close(q, ref_linear(x.detach(), w, a.detach(), b.detach(), 1.5), F32, "group forward (eval)")


def test_autocast_leaves_the_kernels_in_the_input_dtype(backend: str) -> None:
    """Under autocast(cpu, bf16), fp32 inputs still give fp32 results equal to the fp32 reference (and bf16 in bf16)."""
    torch.manual_seed(41)
    case = MLPCase(hidden=12, inter=18, dtype=F32, dropouts=(0.0, 0.4, 0.0))
    x = leaf(2, 4, 12, dtype=F32)
    with torch.autocast("cpu", dtype=BF16):
        y, masks = case.run(x, "silu")
        assert y.dtype == F32
        dy = torch.randn_like(y)
        y.backward(dy)
    yr, xr, ar, br, biasr = case.reference(x, "silu", masks)
    yr.backward(dy)
    close(y, yr, F32, "forward under autocast")
    case.check_grads(x, xr, ar, br, biasr)

    xb, wb, ab, bb = (t.detach().to(BF16) for t in (x, case.projections[0].weight, case.a[0], case.b[0]))
    with torch.autocast("cpu", dtype=BF16):
        yb = fused_lora(xb, wb, ab, bb, 0.5)
    assert yb.dtype == BF16
    close(yb, ref_linear(xb.float(), wb.float(), ab.float(), bb.float(), 0.5), BF16, "bf16 under autocast")


def test_backward_twice_with_retain_graph_accumulates(backend: str) -> None:
    """Backward twice through one graph (dropout everywhere, h kept and recomputed): the same masks, grads double."""
    torch.manual_seed(42)
    case = MLPCase(hidden=9, inter=11, dtype=F32, dropouts=(0.5, 0.5, 0.5))
    x = leaf(4, 9, dtype=F32)
    w, a, b = leaf(7, 9, dtype=F32, grad=False), leaf(3, 9, dtype=F32), leaf(7, 3, dtype=F32)
    y = fused_lora_mlp(x, *case.projections, act="gelu_tanh")
    y2 = fused_lora_mlp(x, *case.projections, act="silu", recompute_hidden=True)
    z = fused_lora(x, w, a, b, 2.0, dropout=0.5)
    loss = sum((t * torch.randn_like(t)).sum() for t in (y, y2, z))
    leaves = [x, a, b, *case.a, *case.b, case.bias[0], case.bias[2]]
    loss.backward(retain_graph=True)
    first = [t.grad.clone() for t in leaves]
    loss.backward()
    for i, (t, g) in enumerate(zip(leaves, first, strict=True)):
        assert g.abs().sum() > 0, f"leaf {i}: zero gradient"
        torch.testing.assert_close(t.grad, 2 * g, rtol=1e-6, atol=1e-6, msg=f"leaf {i}: second backward differs")


# ------------------------------------------------------------------ regressions: bugs these tests found, now fixed
def test_strided_bias(backend: str) -> None:
    """A bias that is a strided view (bias[n] at stride 2) must be read as bias[n], as F.linear reads it."""
    torch.manual_seed(50)
    x, w = torch.randn(5, 12), torch.randn(9, 12)
    a, b = torch.randn(2, 12), torch.randn(9, 2)
    bias = torch.randn(9, 2)[:, 0]  # (9,), stride 2
    assert not bias.is_contiguous()
    close(lowrank_matmul(x, w.t(), bias=bias), F.linear(x, w, bias), F32, "lowrank_matmul with a strided bias")
    close(fused_lora(x, w, a, b, 0.5, bias), ref_linear(x, w, a, b, 0.5, bias), F32, "fused_lora, strided bias")


def test_group_zero_tokens(backend: str) -> None:
    """An empty batch through fused_lora: empty output, and backward gives an empty dx and zero dA, dB."""
    x = leaf(0, 8, dtype=F32)
    w, a, b = torch.randn(6, 8), leaf(2, 8, dtype=F32), leaf(6, 2, dtype=F32)
    y = fused_lora(x, w, a, b, 1.0, dropout=0.3)
    assert y.shape == (0, 6)
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == (0, 8)
    assert a.grad is not None and not a.grad.any() and b.grad is not None and not b.grad.any()


@pytest.mark.parametrize("kind", ["fused_lora", "fused_lora_mlp"])
def test_output_can_be_modified_in_place(kind: str) -> None:
    """Like nn.Linear's output, the fused output can be modified in place, and gradients still match."""
    torch.manual_seed(51)
    x = leaf(2, 3, 8, dtype=F32)
    if kind == "fused_lora":
        w, a, b = torch.randn(6, 8), leaf(2, 8, dtype=F32), leaf(6, 2, dtype=F32)
        y = fused_lora(x, w, a, b, 1.0)
        xr, ar, br = ref_copy(x), ref_copy(a), ref_copy(b)
        yr = ref_linear(xr, w, ar, br, 1.0)
        pairs = [(x, xr), (a, ar), (b, br)]
    else:
        case = MLPCase(hidden=8, inter=12, dtype=F32)
        y, masks = case.run(x, "silu")
        yr, xr, ar, br, _ = case.reference(x, "silu", masks)
        pairs = [(x, xr), *zip(case.a, ar, strict=True), *zip(case.b, br, strict=True)]
    y.mul_(2.0).relu_()
    yr = (yr * 2.0).relu()
    y.sum().backward()
    yr.sum().backward()
    close(y, yr, F32, "forward")
    for got, want in pairs:
        close(got.grad, want.grad, F32, "grad")


def test_nf4_base_of_another_dtype_is_rejected_like_a_dense_one(backend: str) -> None:
    nf4 = quantize_nf4(torch.randn(6, 8), dtype=BF16)
    with pytest.raises(TypeError, match="base weight"):
        fused_lora(torch.randn(4, 8), nf4, torch.randn(2, 8), torch.randn(6, 2), 1.0)

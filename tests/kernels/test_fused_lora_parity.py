"""Parity of the fused LoRA kernels with plain PyTorch: forward and every gradient, fp32 and bf16, odd shapes."""

from __future__ import annotations

import pytest
import torch
from zenft_testing import close, leaf, ref_copy

from lightning_zenft.kernels import (
    LoRAProjection,
    dropout_mask,
    dual_lowrank,
    fused_lora,
    fused_lora_group,
    fused_lora_mlp,
    glu_reference,
    lora_reference,
    lowrank_matmul,
)
from lightning_zenft.kernels.lora import ProjectionPlan
from lightning_zenft.kernels.runtime import KernelRuntime, default_runtime

DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_lowrank_matmul_all_terms(backend: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x, w = torch.randn(7, 33).to(dtype), torch.randn(65, 33).to(dtype)
    p, q = torch.randn(7, 3).to(dtype), torch.randn(3, 65).to(dtype)
    bias, c0 = torch.randn(65).to(dtype), torch.randn(7, 65).to(dtype)
    want = c0.float() + x.float() @ w.float().t() + p.float() @ q.float() + bias.float()
    close(lowrank_matmul(x, w.t(), p, q, bias, c0.clone()), want, dtype, "c0 + x w + p q + b")
    close(lowrank_matmul(x, w.t()), x.float() @ w.float().t(), dtype, "x w")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias_mode", ["trainable", "frozen", "none"])
def test_fused_lora_matches_reference(backend: str, dtype: torch.dtype, bias_mode: str) -> None:
    if backend == "triton" and bias_mode == "frozen":
        pytest.skip("the bias path is covered by 'trainable'; keeps the interpreter run short")
    torch.manual_seed(1)
    batch, m, k, n, r, s = 2, 7, 33, 65, 3, 0.7
    x = leaf(batch, m, k, dtype=dtype)
    w = leaf(n, k, dtype=dtype, grad=False)
    a, b = leaf(r, k, dtype=dtype, scale=0.3), leaf(n, r, dtype=dtype, scale=0.3)
    bias = None if bias_mode == "none" else leaf(n, dtype=dtype, grad=bias_mode == "trainable")

    y = fused_lora(x, w, a, b, s, bias)
    dy = torch.randn_like(y)
    y.backward(dy)
    xr, wr, ar, br, biasr = (ref_copy(t) for t in (x, w, a, b, bias))
    yr = lora_reference(xr, wr, ar, br, s, biasr)
    yr.backward(dy.float())

    assert y.dtype == dtype
    close(y, yr, dtype, "forward")
    close(x.grad, xr.grad, dtype, "dx")
    close(a.grad, ar.grad, dtype, "dA")
    close(b.grad, br.grad, dtype, "dB")
    if bias_mode == "trainable":
        close(bias.grad, biasr.grad, dtype, "dbias")
    elif bias is not None:
        assert bias.grad is None
    assert w.grad is None, "the frozen base weight must get no gradient"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "n", "r", "split"), [(37, 50, 5, 3), (16, 16, 16, 1), (5, 70, 3, 2), (40, 9, 20, 1)])
def test_dual_lowrank_matches_two_products(triton_on: None, dtype: torch.dtype, m: int, n: int, r: int, split: int):
    """The one-pass kernel: ``dy @ b`` and ``dy.t() @ xa`` over several row blocks and column ranges, padded ranks."""
    from lightning_zenft.kernels._dual_triton import dual_lowrank_triton

    torch.manual_seed(8)
    dy, b, xa = (torch.randn(*shape).to(dtype) for shape in ((m, n), (n, r), (m, r)))
    p, g = dual_lowrank_triton(dy, b, xa, split=split)
    assert p.dtype == g.dtype == dtype
    close(p, dy.float() @ b.float(), dtype, "dy @ b")
    close(g, dy.float().t() @ xa.float(), dtype, "dy.t() @ xa")
    p2, g2 = dual_lowrank(dy, b, xa)  # the dispatcher, Triton under the interpreter
    assert torch.equal(p2, dual_lowrank_triton(dy, b, xa)[0]) and g2.shape == (n, r)


def test_dual_lowrank_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="dual_lowrank needs dy"):
        dual_lowrank(torch.randn(4, 6), torch.randn(5, 2), torch.randn(4, 2))


def test_fused_lora_dropout_uses_one_mask_in_forward_and_backward(backend: str) -> None:
    dtype = torch.float32
    torch.manual_seed(2)
    x = leaf(5, 17, dtype=dtype)
    w = leaf(9, 17, dtype=dtype, grad=False)
    a, b = leaf(4, 17, dtype=dtype), leaf(9, 4, dtype=dtype)
    p = 0.4
    state = torch.get_rng_state()
    y = fused_lora(x, w, a, b, 1.5, dropout=p)
    torch.set_rng_state(state)
    seed = ProjectionPlan([LoRAProjection(w, None, a, b, 1.5, p)], training=True).seeds[0]
    mask = dropout_mask(torch.Size((5, 17)), p, seed, x.device, dtype)
    assert 0 < (mask == 0).sum() < mask.numel()
    dy = torch.randn_like(y)
    y.backward(dy)
    xr, ar, br = (ref_copy(t) for t in (x, a, b))
    yr = lora_reference(xr, w, ar, br, 1.5, dropout_multiplier=mask)
    yr.backward(dy)
    close(y, yr, dtype, "forward")
    close(x.grad, xr.grad, dtype, "dx")
    close(a.grad, ar.grad, dtype, "dA")
    close(b.grad, br.grad, dtype, "dB")
    # eval mode: dropout off
    torch.testing.assert_close(fused_lora(x, w, a, b, 1.5, dropout=p, training=False), lora_reference(x, w, a, b, 1.5))


def test_fused_lora_rejects_a_trainable_base_weight() -> None:
    w = torch.randn(4, 3, requires_grad=True)
    with pytest.raises(ValueError, match="base weight requires grad"):
        fused_lora(torch.randn(2, 3), w, torch.randn(2, 3), torch.randn(4, 2), 1.0)
    with pytest.raises(ValueError, match="expected weight"):
        fused_lora(torch.randn(2, 5), w.detach(), torch.randn(2, 3), torch.randn(4, 2), 1.0)
    with pytest.raises(ValueError, match=r"bias has shape \(1,\); expected \(4,\)"):
        fused_lora(torch.randn(2, 3), w.detach(), torch.randn(2, 3), torch.randn(4, 2), 1.0, torch.zeros(1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("drop", [(0.0, 0.0, 0.5), (0.5, 0.0, 0.0), (0.3, 0.0, 0.5), (0.0, 0.0, 0.0)], ids=str)
def test_group_of_three_matches_three_references(backend: str, dtype: torch.dtype, drop: tuple) -> None:
    torch.manual_seed(3)
    m, k = 7, 33
    outs, ranks = [65, 17, 17], [3, 5, 2]
    x = leaf(m, k, dtype=dtype)
    ws = [leaf(n, k, dtype=dtype, grad=False) for n in outs]
    as_ = [leaf(r, k, dtype=dtype, scale=0.3) for r in ranks]
    bs = [leaf(n, r, dtype=dtype, scale=0.3) for n, r in zip(outs, ranks, strict=True)]
    biases = [leaf(outs[0], dtype=dtype), None, leaf(outs[2], dtype=dtype, grad=False)]
    projs = [LoRAProjection(ws[i], biases[i], as_[i], bs[i], 0.5 + i, drop[i]) for i in range(3)]
    state = torch.get_rng_state()
    ys = fused_lora_group(x, projs)
    torch.set_rng_state(state)
    seeds = ProjectionPlan(projs, training=True).seeds
    masks = [dropout_mask(torch.Size((m, k)), d, seeds[i], x.device, dtype) if d else None for i, d in enumerate(drop)]
    dys = [torch.randn_like(y) for y in ys]
    torch.autograd.backward(ys, dys)

    xr = ref_copy(x)
    refs = []
    for i in range(3):
        ar, br, biasr = ref_copy(as_[i]), ref_copy(bs[i]), ref_copy(biases[i])
        yr = lora_reference(xr, ws[i].float(), ar, br, 0.5 + i, biasr, masks[i])
        yr.backward(dys[i].float())
        refs.append((yr, ar, br, biasr))
    for i, (yr, ar, br, _) in enumerate(refs):
        close(ys[i], yr, dtype, f"y{i}")
        close(as_[i].grad, ar.grad, dtype, f"dA{i}")
        close(bs[i].grad, br.grad, dtype, f"dB{i}")
    close(biases[0].grad, refs[0][3].grad, dtype, "dbias0")
    close(x.grad, xr.grad, dtype, "dx (sum over the group)")
    assert all(w.grad is None for w in ws)


@pytest.mark.parametrize(
    ("dtype", "act"), [(torch.float32, "silu"), (torch.bfloat16, "silu"), (torch.float32, "gelu_tanh")]
)
def test_mlp_matches_reference(backend: str, dtype: torch.dtype, act: str) -> None:
    torch.manual_seed(4)
    m, hidden, inter, r = 7, 33, 65, 3
    x = leaf(2, m, hidden, dtype=dtype)
    wg, wu = leaf(inter, hidden, dtype=dtype, grad=False, scale=0.3), leaf(inter, hidden, dtype=dtype, grad=False)
    wd = leaf(hidden, inter, dtype=dtype, grad=False, scale=0.3)
    a = [leaf(r, hidden, dtype=dtype, scale=0.3), leaf(r, hidden, dtype=dtype, scale=0.3), leaf(r, inter, dtype=dtype)]
    b = [leaf(inter, r, dtype=dtype, scale=0.3), leaf(inter, r, dtype=dtype, scale=0.3), leaf(hidden, r, dtype=dtype)]
    bias_u = leaf(inter, dtype=dtype)
    gate = LoRAProjection(wg, None, a[0], b[0], 2.0)
    up = LoRAProjection(wu, bias_u, a[1], b[1], 2.0)
    down = LoRAProjection(wd, None, a[2], b[2], 0.5)
    y = fused_lora_mlp(x, gate, up, down, act)
    dy = torch.randn_like(y)
    y.backward(dy)

    xr, ar, br, bias_ur = ref_copy(x), [ref_copy(t) for t in a], [ref_copy(t) for t in b], ref_copy(bias_u)
    g = lora_reference(xr, wg.float(), ar[0], br[0], 2.0)
    u = lora_reference(xr, wu.float(), ar[1], br[1], 2.0, bias_ur)
    yr = lora_reference(glu_reference(g, u, act), wd.float(), ar[2], br[2], 0.5)
    yr.backward(dy.float())
    close(y, yr, dtype, "forward")
    close(x.grad, xr.grad, dtype, "dx")
    close(bias_u.grad, bias_ur.grad, dtype, "dbias_up")
    for i, name in enumerate(("gate", "up", "down")):
        close(a[i].grad, ar[i].grad, dtype, f"dA_{name}")
        close(b[i].grad, br[i].grad, dtype, f"dB_{name}")
    assert all(w.grad is None for w in (wg, wu, wd))


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("down_a_trains", [True, False])
def test_mlp_saves_each_adapted_input_once(recompute: bool, down_a_trains: bool) -> None:
    """Saved for backward: x, g, u, the (M, r) low-rank activations, and h = act(g) * u only when dA_down needs it
    and it is not recomputed."""
    torch.manual_seed(5)
    m, hidden, inter, r = 6, 8, 24, 2
    x = leaf(m, hidden, dtype=torch.float32)

    def projection(n_out: int, n_in: int) -> LoRAProjection:
        f32 = torch.float32
        return LoRAProjection(torch.randn(n_out, n_in), None, leaf(r, n_in, dtype=f32), leaf(n_out, r, dtype=f32), 1.0)

    proj = [projection(inter, hidden), projection(inter, hidden), projection(hidden, inter)]
    proj[2].lora_a.requires_grad_(down_a_trains)
    saved: list[torch.Size] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        y = fused_lora_mlp(x, *proj, recompute_hidden=recompute)
    activations = [s for s in saved if s[0] == m]
    want = [torch.Size([m, hidden]), torch.Size([m, inter]), torch.Size([m, inter])] + [torch.Size([m, r])] * 3
    if down_a_trains and not recompute:
        want.append(torch.Size([m, inter]))  # h, for dA_down
    assert sorted(activations) == sorted(want)
    # both ways give the same gradients as the plain computation
    y.backward(torch.ones_like(y))
    xr = ref_copy(x)
    refs = [(ref_copy(p.lora_a), ref_copy(p.lora_b)) for p in proj]
    g = lora_reference(xr, proj[0].weight, *refs[0], 1.0)
    u = lora_reference(xr, proj[1].weight, *refs[1], 1.0)
    yr = lora_reference(torch.nn.functional.silu(g) * u, proj[2].weight, *refs[2], 1.0)
    yr.backward(torch.ones_like(yr))
    close(x.grad, xr.grad, torch.float32, "dx")
    for p, (ar, br) in zip(proj, refs, strict=True):
        close(p.lora_b.grad, br.grad, torch.float32, "dB")
        if p.lora_a.requires_grad:
            close(p.lora_a.grad, ar.grad, torch.float32, "dA")
        else:
            assert p.lora_a.grad is None


def test_group_member_whose_output_is_unused_gets_no_gradient(backend: str) -> None:
    """As with separate layers: an output that takes no part in the loss leaves its adapter's gradients None."""
    torch.manual_seed(9)
    x = leaf(6, 10, dtype=torch.float32)
    ws = [torch.randn(7, 10), torch.randn(5, 10)]
    as_ = [leaf(2, 10, dtype=torch.float32) for _ in ws]
    bs = [leaf(w.shape[0], 2, dtype=torch.float32) for w in ws]
    y0, _ = fused_lora_group(x, [LoRAProjection(w, None, a, b, 1.5) for w, a, b in zip(ws, as_, bs, strict=True)])
    y0.square().sum().backward()
    assert as_[1].grad is None and bs[1].grad is None
    xr, ar, br = ref_copy(x), ref_copy(as_[0]), ref_copy(bs[0])
    lora_reference(xr, ws[0], ar, br, 1.5).square().sum().backward()
    close(x.grad, xr.grad, torch.float32, "dx")
    close(as_[0].grad, ar.grad, torch.float32, "dA")
    close(bs[0].grad, br.grad, torch.float32, "dB")


def test_auto_backend_keeps_the_fastest_per_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first call for a key times every candidate once; later calls reuse the choice; a failing TMA build is
    dropped with one warning and never tried again, while any other failure propagates."""
    from lightning_zenft.kernels import matmul

    times = {"torch": 2.0, "triton": 1.0, "tma": 0.5}
    timed: list[str] = []

    def fake_time(fn: object) -> float:
        name = fn()
        timed.append(name)
        return times[name]

    def broken() -> str:
        raise RuntimeError("no TMA here")

    monkeypatch.setattr(matmul, "_time_ms", fake_time)
    rt = KernelRuntime()
    two = {"torch": lambda: "torch", "triton": lambda: "triton"}
    assert matmul._fastest(("k", 1), two, rt) == "triton"
    times.update(torch=0.1)
    assert matmul._fastest(("k", 1), two, rt) == "triton"  # cached
    assert timed == ["torch", "triton"]
    assert matmul._fastest(("k", 2), two | {"tma": lambda: "tma"}, rt) == "torch"  # a new key is timed
    with pytest.warns(UserWarning, match="TMA GEMM failed here and is not used .RuntimeError: no TMA here"):
        assert matmul._fastest(("k", 3), two | {"tma": broken}, rt) == "torch"
    assert rt.tma_failed and not matmul._tma_eligible(torch.zeros(16, 16), torch.zeros(16, 16), rt)
    assert not default_runtime().choices  # the runtime passed in holds the choices, not the default one
    with pytest.raises(RuntimeError, match="no TMA here"):
        matmul._fastest(("k", 4), {"torch": broken}, rt)


def test_mlp_backward_stops_at_down_when_nothing_upstream_trains(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only down's adapter trains and x needs no gradient: no GLU or gate/up backward runs; down's grads are exact."""
    from lightning_zenft.kernels import mlp

    F32 = torch.float32  # noqa: N806

    def no_glu_backward(*_: object) -> None:
        raise AssertionError("the GLU backward ran although nothing upstream of h needs a gradient")

    torch.manual_seed(10)
    x = torch.randn(5, 8)
    projections = [
        LoRAProjection(torch.randn(12, 8), None, torch.randn(2, 8), torch.randn(12, 2), 1.0),
        LoRAProjection(torch.randn(12, 8), None, torch.randn(2, 8), torch.randn(12, 2), 1.0),
        LoRAProjection(torch.randn(8, 12), None, leaf(2, 12, dtype=F32), leaf(8, 2, dtype=F32), 1.0),
    ]
    monkeypatch.setattr(mlp, "glu_backward", no_glu_backward)
    fused_lora_mlp(x, *projections).square().sum().backward()
    g = lora_reference(x, projections[0].weight, projections[0].lora_a, projections[0].lora_b, 1.0)
    u = lora_reference(x, projections[1].weight, projections[1].lora_a, projections[1].lora_b, 1.0)
    ad, bd = ref_copy(projections[2].lora_a), ref_copy(projections[2].lora_b)
    lora_reference(torch.nn.functional.silu(g) * u, projections[2].weight, ad, bd, 1.0).square().sum().backward()
    close(projections[2].lora_a.grad, ad.grad, F32, "dA down")
    close(projections[2].lora_b.grad, bd.grad, F32, "dB down")


@pytest.mark.parametrize("dtype", DTYPES)
def test_tma_gemm_matches_the_reference(triton_on: None, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """The TMA variant of the epilogue GEMM: every term, both weight layouts, odd M and N, and the backward through it;
    operands TMA cannot fetch (rows not a multiple of 16 bytes) fall back to the pointer kernel."""
    from lightning_zenft.kernels import _matmul_triton as mm
    from lightning_zenft.kernels import set_matmul_backend

    launches: list[bool] = []
    original = mm._launch_tma
    monkeypatch.setattr(mm, "_launch_tma", lambda *a: launches.append(True) or original(*a))
    monkeypatch.setattr(default_runtime(), "tma_failed", [])
    set_matmul_backend("triton-tma")
    try:
        torch.manual_seed(11)
        for m, k, n, r in [(37, 48, 40, 5), (16, 32, 72, 16)]:
            x, big_w = torch.randn(m, k).to(dtype), torch.randn(n, k).to(dtype)
            p, q = torch.randn(m, r).to(dtype), torch.randn(r, n).to(dtype)
            bias, c0 = torch.randn(n).to(dtype), torch.randn(m, n).to(dtype)
            want = c0.float() + x.float() @ big_w.float().t() + p.float() @ q.float() + bias.float()
            for w in (big_w.t(), big_w.t().contiguous()):  # (N, K) row-major weight, or a (K, N) one
                close(lowrank_matmul(x, w, p, q, bias, c0.clone()), want, dtype, f"tma {m}x{k}x{n}")
        assert len(launches) == 4
        x, w = leaf(9, 16, dtype=dtype), leaf(24, 16, dtype=dtype, grad=False)
        a, b = leaf(4, 16, dtype=dtype, scale=0.3), leaf(24, 4, dtype=dtype, scale=0.3)
        y = fused_lora(x, w, a, b, 1.5)
        y.square().sum().backward()
        xr, ar, br = ref_copy(x), ref_copy(a), ref_copy(b)
        lora_reference(xr, w.float(), ar, br, 1.5).square().sum().backward()
        for got, want, what in ((x.grad, xr.grad, "dx"), (a.grad, ar.grad, "dA"), (b.grad, br.grad, "dB")):
            close(got, want, dtype, what)
        assert len(launches) == 6  # forward and the input gradient ran on TMA
        odd, w33 = torch.randn(5, 33).to(dtype), torch.randn(33, 8).to(dtype)  # rows of 33: not 16-byte multiples
        assert not mm.tma_compatible(odd, w33)
        close(lowrank_matmul(odd, w33), odd.float() @ w33.float(), dtype, "fallback to the pointer kernel")
        assert len(launches) == 6
    finally:
        set_matmul_backend("auto")


def test_matmul_choices_names_each_timed_product(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_zenft.kernels import matmul_choices

    choices = {
        ("mm", 8192, (4096, 14336), (True, False, True), 16, torch.bfloat16, True, False, 0): "tma",
        ("dual", 8192, 14336, 16, torch.bfloat16, 0): "torch",
    }
    monkeypatch.setattr(default_runtime(), "choices", choices)
    assert matmul_choices() == {
        "mm M<=8192 w(4096, 14336) r=16 bfloat16+bias tma-readable": "tma",
        "dual M<=8192 N=14336 r=16 bfloat16": "torch",
    }

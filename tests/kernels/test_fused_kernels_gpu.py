"""The same parity checks on a GPU at real shapes (compiled Triton kernels, autotuned); skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from lightning_zenft.kernels import (
    LoRAProjection,
    dequantize_nf4_reference,
    fused_lora,
    fused_lora_mlp,
    glu_reference,
    lora_reference,
    quantize_nf4,
    set_matmul_backend,
    set_triton_enabled,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(autouse=True, params=["triton", "triton-tma", "torch"])
def matmul_backend(request: pytest.FixtureRequest):
    set_triton_enabled(True)
    set_matmul_backend(request.param)
    yield request.param
    set_matmul_backend("auto")
    set_triton_enabled(False)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize(("k", "n"), [(4096, 4096), (4096, 14336), (14336, 4096)])
def test_fused_lora_real_shapes(k: int, n: int) -> None:
    torch.manual_seed(0)
    dev, dtype, m, r = "cuda", torch.bfloat16, 2048, 16
    x = torch.randn(m, k, device=dev, dtype=dtype, requires_grad=True)
    w = torch.randn(n, k, device=dev, dtype=dtype) / k**0.5
    bias = torch.randn(n, device=dev, dtype=dtype, requires_grad=True)
    a = (torch.randn(r, k, device=dev, dtype=dtype) / k**0.5).requires_grad_()
    b = (torch.randn(n, r, device=dev, dtype=dtype) / r**0.5).requires_grad_()
    y = fused_lora(x, w, a, b, 2.0, bias)
    dy = torch.randn_like(y)
    y.backward(dy)
    ref = [t.detach().float().requires_grad_() for t in (x, a, b, bias)]
    yr = lora_reference(ref[0], w.float(), ref[1], ref[2], 2.0, ref[3])
    yr.backward(dy.float())
    assert rel_err(y, yr) < 1e-2
    for got, want in zip((x.grad, a.grad, b.grad, bias.grad), (t.grad for t in ref), strict=True):
        assert rel_err(got, want) < 1e-2


@pytest.mark.parametrize(("m", "n", "r"), [(8192, 4096, 16), (8192, 14336, 16), (4097, 1024, 8)])
def test_dual_lowrank_real_shapes(m: int, n: int, r: int) -> None:
    from lightning_zenft.kernels._dual_triton import dual_lowrank_triton

    torch.manual_seed(2)
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, r, device="cuda", dtype=torch.bfloat16)
    xa = torch.randn(m, r, device="cuda", dtype=torch.bfloat16)
    p, g = dual_lowrank_triton(dy, b, xa)
    assert rel_err(p, dy.float() @ b.float()) < 1e-2
    assert rel_err(g, dy.float().t() @ xa.float()) < 1e-2


def test_fused_lora_mlp_and_nf4_real_shapes() -> None:
    torch.manual_seed(1)
    dev, dtype, m, h, i, r = "cuda", torch.bfloat16, 1024, 4096, 14336, 16
    x = torch.randn(m, h, device=dev, dtype=dtype, requires_grad=True)
    nf4 = [quantize_nf4(torch.randn(*s, device=dev) / s[1] ** 0.5, dtype=dtype) for s in ((i, h), (i, h), (h, i))]
    dense = [dequantize_nf4_reference(q).float() for q in nf4]
    a = [(torch.randn(r, s, device=dev, dtype=dtype) / s**0.5).requires_grad_() for s in (h, h, i)]
    b = [(torch.randn(s, r, device=dev, dtype=dtype) / r**0.5).requires_grad_() for s in (i, i, h)]
    projs = [LoRAProjection(nf4[j], None, a[j], b[j], 2.0) for j in range(3)]
    y = fused_lora_mlp(x, *projs, act="silu")
    dy = torch.randn_like(y)
    y.backward(dy)
    xr = x.detach().float().requires_grad_()
    ar = [t.detach().float().requires_grad_() for t in a]
    br = [t.detach().float().requires_grad_() for t in b]
    g = lora_reference(xr, dense[0], ar[0], br[0], 2.0)
    u = lora_reference(xr, dense[1], ar[1], br[1], 2.0)
    yr = lora_reference(glu_reference(g, u, "silu"), dense[2], ar[2], br[2], 2.0)
    yr.backward(dy.float())
    assert rel_err(y, yr) < 2e-2
    assert rel_err(x.grad, xr.grad) < 2e-2
    for j in range(3):
        assert rel_err(a[j].grad, ar[j].grad) < 2e-2
        assert rel_err(b[j].grad, br[j].grad) < 2e-2


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_dora_real_shapes(dropout: float) -> None:
    """DoRA at 4096 x 4096 (bf16, 2048 tokens), with and without dropout, against fp32 DoRA on the same mask."""
    from lightning_zenft.kernels import dropout_mask, fused_dora
    from lightning_zenft.kernels.lora import ProjectionPlan

    torch.manual_seed(3)
    dev, dtype, m, k, n, r, s = "cuda", torch.bfloat16, 2048, 4096, 4096, 16, 2.0
    x = torch.randn(m, k, device=dev, dtype=dtype, requires_grad=True)
    w = torch.randn(n, k, device=dev, dtype=dtype) / k**0.5
    a = (torch.randn(r, k, device=dev, dtype=dtype) / k**0.5).requires_grad_()
    b = (torch.randn(n, r, device=dev, dtype=dtype) / r**0.5).requires_grad_()
    mag = (torch.rand(n, device=dev, dtype=dtype) + 0.5).requires_grad_()
    state = torch.get_rng_state()
    y = fused_dora(x, w, a, b, mag, s, dropout=dropout)
    torch.set_rng_state(state)
    seed = ProjectionPlan([LoRAProjection(w, None, a, b, s, dropout)], training=True).seeds[0]
    mask = None if dropout == 0 else dropout_mask(x.shape, dropout, seed, x.device, dtype).float()
    dy = torch.randn_like(y)
    y.backward(dy)
    xr, ar, br, mr = (t.detach().float().requires_grad_() for t in (x, a, b, mag))
    wf = w.float()
    gain = mr / torch.linalg.norm(wf + s * (br @ ar), dim=1).detach()
    xd = xr if mask is None else xr * mask
    lora = torch.nn.functional.linear(torch.nn.functional.linear(xd, ar), br)
    yr = xr @ wf.t() + (gain - 1) * (xd @ wf.t()) + gain * s * lora
    yr.backward(dy.float())
    assert rel_err(y, yr) < 2e-2
    for got, want in ((x.grad, xr.grad), (a.grad, ar.grad), (b.grad, br.grad), (mag.grad, mr.grad)):
        assert rel_err(got, want) < 2e-2


def test_fused_kernels_callback_with_liger_on_gpu() -> None:
    pytest.importorskip("liger_kernel")
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_zenft.adapters import LoRALinear
    from lightning_zenft.fusion import apply_liger, fuse_lora_layers, restore_liger

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
    )
    model = LlamaForCausalLM(cfg).cuda().to(torch.bfloat16)
    for p in model.parameters():
        p.requires_grad_(False)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear):
                layer = LoRALinear(child, r=8, alpha=16)
                torch.nn.init.normal_(layer.lora_B.weight, std=0.02)
                setattr(parent, name, layer)
    ids = torch.randint(0, 1000, (2, 128), device="cuda")

    def step() -> tuple[float, torch.Tensor]:
        for p in model.parameters():
            p.grad = None
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item(), model.lm_head.lora_B.weight.grad.clone()

    model.train()
    want_loss, want_grad = step()
    fuse_lora_layers(model)
    patches = apply_liger(model)
    assert patches.names("rms_norm") and patches.names("fused_linear_cross_entropy")
    got_loss, got_grad = step()
    restore_liger(patches)
    assert abs(got_loss - want_loss) < 2e-2 * abs(want_loss)
    assert rel_err(got_grad, want_grad) < 5e-2

"""Packed4bitTensor and ShardedLinear4bit in one process: the ops FSDP2 applies, its all-gather extension simulated
(shards concatenated as the collective would), and the layer against the bitsandbytes layer it replaces."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("bitsandbytes", reason="the 4-bit layers are bitsandbytes'")

from lightning_zenft.kernels.nf4 import NF4Weight, dequantize_nf4_reference  # noqa: E402
from lightning_zenft.precision import Packed4bitTensor, QuantSpec, ShardedLinear4bit, to_linear4bit  # noqa: E402
from lightning_zenft.precision.quantize import MODES, dequantize  # noqa: E402


class _Mesh:
    def __init__(self, size: int) -> None:
        self._size = size

    def size(self) -> int:
        return self._size


def _layer(mode: str = "nf4-dq", out: int = 96, inp: int = 128) -> nn.Module:
    torch.manual_seed(0)
    return to_linear4bit(nn.Linear(inp, out), QuantSpec.from_mode(mode, compute_dtype=torch.float32))


def _gather(shards: list[Packed4bitTensor], world: int) -> Packed4bitTensor:
    """What FSDP2 does around the collective: pre_all_gather per rank, concatenate each input, post_all_gather."""
    full = shards[0].shape[0] * world
    inputs = [s.fsdp_pre_all_gather(_Mesh(world), torch.Size((full, s.shape[1])), (s.shape[1], 1), None, None)
              for s in shards]  # fmt: skip
    outputs = tuple(torch.cat(parts) for parts in zip(*[i for i, _ in inputs], strict=True))
    tensor, _ = shards[0].fsdp_post_all_gather(outputs, inputs[0][1], torch.float32)
    return tensor


@pytest.mark.parametrize("mode", MODES)
def test_rows_split_gathered_back_dequantize_exactly(mode):
    layer = _layer(mode)
    weight = Packed4bitTensor.from_params4bit(layer.weight, torch.float32)
    want = dequantize(layer.weight)
    assert weight.shape == (96, 128) and weight.dtype == torch.float32
    assert torch.equal(weight.dequantize(), want)
    shards = list(torch.chunk(weight, 2, dim=0))  # FSDP2's split, through aten.split
    assert [tuple(s.shape) for s in shards] == [(48, 128), (48, 128)]
    with pytest.raises(RuntimeError, match="cannot be dequantized on its own"):
        shards[0].dequantize()
    assert torch.equal(_gather(shards, 2).dequantize(), want)
    assert torch.equal(_gather([weight], 1).dequantize(), want)  # FSDP2's single-rank path: one byte tensor
    assert torch.equal(weight.to_params4bit().data, layer.weight.data)


def test_the_ops_fsdp2_applies_to_a_parameter():
    weight = Packed4bitTensor.from_params4bit(_layer().weight, torch.float32)
    (first, second) = torch.chunk(weight, 2, dim=0)
    padded = first.new_zeros((50, 128))  # FSDP2 pads a shard to the largest one
    padded.narrow(0, 0, 48).copy_(first)
    assert torch.equal(padded[:48].packed, first.packed) and torch.equal(padded[:48].absmax, first.absmax)
    assert padded.view(-1).shape == (50 * 128,)
    param = nn.Parameter(weight, requires_grad=False)  # detach
    assert isinstance(param, Packed4bitTensor) and not param.requires_grad
    same = torch.as_strided(weight, (96, 128), (128, 1), 0)
    assert torch.equal(same.dequantize(), weight.dequantize())
    assert torch.equal(weight.to("cpu").dequantize(), weight.dequantize())
    assert torch.equal(weight.to(torch.bfloat16), weight.dequantize(torch.bfloat16))  # a dtype change dequantizes
    assert torch.equal(weight.clone().packed, weight.packed)
    with pytest.raises(NotImplementedError, match="does not implement aten.mm"):
        torch.mm(torch.ones(2, 96), weight)
    with pytest.raises(NotImplementedError, match="along dim 0"):
        torch.chunk(weight, 2, dim=1)
    with pytest.raises(NotImplementedError, match="another 4-bit tensor"):
        weight.copy_(torch.zeros(96, 128))


def test_widths_and_rank_counts_that_cannot_shard_are_errors():
    with pytest.raises(ValueError, match="width 96 is not a multiple of the quantization block 64"):
        Packed4bitTensor.from_params4bit(_layer(inp=96).weight, torch.float32)
    weight = Packed4bitTensor.from_params4bit(_layer(out=90).weight, torch.float32)
    with pytest.raises(ValueError, match="over 4 ranks cannot shard a 4-bit weight of 90 rows"):
        weight.fsdp_pre_all_gather(_Mesh(4), torch.Size((90, 128)), (128, 1), nn.Linear(1, 1), None)


@pytest.mark.parametrize("mode", ["nf4", "fp4-dq"])
def test_sharded_layer_equals_the_bitsandbytes_layer(mode):
    layer = _layer(mode)
    layer.bias.requires_grad_(False)
    sharded = ShardedLinear4bit.from_linear4bit(layer)
    x = torch.randn(3, 7, 128, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = sharded(x), layer(x_ref)
    assert torch.equal(y, y_ref)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    assert torch.equal(x.grad, x_ref.grad)
    assert torch.equal(sharded.dequantize_weight(), dequantize(layer.weight))
    back = sharded.to_linear4bit()
    assert torch.equal(back.weight.data, layer.weight.data) and back.bias is layer.bias
    kernel_view = sharded.nf4_weight()  # what the fused kernels read
    if mode == "nf4":
        assert isinstance(kernel_view, NF4Weight)
        assert torch.equal(dequantize_nf4_reference(kernel_view), dequantize(layer.weight))
    else:
        assert torch.equal(kernel_view.dense(), dequantize(layer.weight))

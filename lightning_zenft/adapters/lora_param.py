r"""LoRA on a parameter: the fused 3-D expert weights of mixture-of-experts layers (one low-rank update per expert).

Current ``transformers`` MoE models (Mixtral, Qwen-MoE, OLMoE...) keep their experts as one module with stacked
weights, e.g. ``gate_up_proj`` of shape ``(E, 2I, H)`` and ``down_proj`` ``(E, H, I)``, used as
``F.linear(x, W[e])``: there is no ``nn.Linear`` to wrap. This module wraps the experts module and, for one of its
parameters ``W`` (``(E, out, in)``), adds a rank-``r`` update per expert:

.. math::  W'_e = W_e + s\, B_e A_e, \qquad A_e \in \mathbb{R}^{r \times in},\; B_e \in \mathbb{R}^{out \times r}

The factors are stored as HF PEFT stores them for ``target_parameters`` (so files move between the two):
``lora_A`` is an ``nn.Linear(in, r E)`` whose weight reshapes to ``(E, r, in)``, and ``lora_B`` an
``nn.Linear(r E, out)`` whose weight reshapes to ``(out, r, E)``. A parameter stored as ``(E, in, out)`` (experts
modules with ``is_transposed = True``) is handled as PEFT does. Several parameters of one module nest: the wrapper of
the first sits inside the wrapper of the second (``experts.base_layer.lora_A`` is the first one's), as in PEFT.

The forward runs the experts module with ``W'`` in place of ``W`` (``torch.func.functional_call``): the adapted
weight stack exists only during the call. ``B`` starts at zero, so the model starts at the base. Dropout cannot be
applied to the input of one parameter of a module, so it must be 0.

Example::

    layer = LoRAParameter(model.model.layers[0].mlp.experts, "down_proj", r=4, alpha=8)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from lightning_zenft.adapters.lora import LoRAInit, lora_scaling


def _owner(module: nn.Module) -> nn.Module:
    """The module that owns the parameters: the innermost ``base_layer`` of nested parameter adapters."""
    while isinstance(module, LoRAParameter):
        module = module.base_layer
    return module


class LoRAParameter(nn.Module):
    """A per-expert low-rank update of one 3-D (or 2-D) parameter of ``base`` (see the module docstring).

    Args:
        base: the module holding the parameter (or another ``LoRAParameter`` wrapping it).
        parameter_name: the parameter's name in the module that owns it (e.g. ``"gate_up_proj"``).
        r, alpha, use_rslora, init: as :class:`~lightning_zenft.adapters.LoRALinear`; ``init`` is ``"kaiming"`` or
            ``"gaussian"`` (PiSSA has no per-expert form here).
        dropout: must be 0.
    """

    def __init__(
        self,
        base: nn.Module,
        parameter_name: str,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: LoRAInit = "kaiming",
    ) -> None:
        super().__init__()
        owner = _owner(base)
        param = getattr(owner, parameter_name, None)
        if not isinstance(param, nn.Parameter):
            raise ValueError(f"{type(owner).__name__} has no parameter {parameter_name!r} to adapt.")
        if dropout:
            raise ValueError(
                f"LoRA on the parameter {parameter_name!r} cannot use dropout={dropout}: the module's input cannot be "
                "dropped for one of its weights only. Use dropout=0.0."
            )
        if init not in ("kaiming", "gaussian"):
            raise ValueError(f"LoRA on the parameter {parameter_name!r}: init={init!r} is not supported here.")
        if r < 1:
            raise ValueError(f"LoRA rank r={r} must be a positive integer.")
        if param.dim() == 3:
            experts, d1, d2 = param.shape
            transposed = bool(getattr(owner, "is_transposed", False))  # (E, in, out) instead of (E, out, in)
        elif param.dim() == 2:
            experts, (d1, d2), transposed = 1, param.shape, False
        else:
            raise ValueError(f"{parameter_name!r} has {param.dim()} dimensions; 2-D and 3-D parameters are adapted.")
        self.base_layer = base
        self.parameter_name = parameter_name
        self.num_experts = int(experts)
        self.transposed = transposed
        self.out_features, self.in_features = (int(d2), int(d1)) if transposed else (int(d1), int(d2))
        self.r, self.alpha, self.use_rslora, self.init = r, float(alpha), use_rslora, init
        self.scaling = lora_scaling(r, alpha, use_rslora)
        dtype = param.dtype if param.is_floating_point() else torch.float32
        kw: dict[str, Any] = {"bias": False, "device": param.device, "dtype": dtype}
        self.lora_A = nn.Linear(self.in_features, r * self.num_experts, **kw)
        self.lora_B = nn.Linear(r * self.num_experts, self.out_features, **kw)
        self.lora_dropout = nn.Identity()
        self.merged = False
        self.disabled = False
        for p in base.parameters():
            p.requires_grad_(False)
        self.reset_adapter_parameters()

    @torch.no_grad()
    def reset_adapter_parameters(self) -> None:
        if self.init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        else:
            nn.init.normal_(self.lora_A.weight, std=1.0 / self.r)
        nn.init.zeros_(self.lora_B.weight)

    # ------------------------------------------------------------------ protocol
    def adapter_params(self) -> list[str]:
        return ["lora_A.weight", "lora_B.weight"]

    def settings(self) -> dict[str, Any]:
        return {
            "parameter_name": self.parameter_name,
            "r": self.r,
            "alpha": self.alpha,
            "dropout": 0.0,
            "use_rslora": self.use_rslora,
            "use_dora": False,
            "init": self.init,
        }

    def export_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {"lora_A.weight": self.lora_A.weight.detach(), "lora_B.weight": self.lora_B.weight.detach()}
        return tensors, self.settings()

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` per expert: ``A`` ``(E, r, in)`` and ``B`` ``(E, out, r)``."""
        a = self.lora_A.weight.reshape(self.num_experts, self.r, self.in_features)  # (E, r, in)
        b = self.lora_B.weight.reshape(self.out_features, self.r, self.num_experts).permute(2, 0, 1)  # (E, out, r)
        return a, b

    def delta_weight(self) -> torch.Tensor:
        """``s B_e A_e`` for every expert, in the parameter's own layout and shape."""
        a, b = self.factors()
        delta = self.scaling * torch.bmm(b, a)  # (E, out, in)
        if self.transposed:
            delta = delta.transpose(1, 2)  # (E, in, out)
        return delta if self._param().dim() == 3 else delta[0]

    def _param(self) -> nn.Parameter:
        return getattr(_owner(self.base_layer), self.parameter_name)

    def _path(self) -> str:
        """The parameter's name relative to ``base_layer`` (through nested parameter adapters)."""
        depth, module = 0, self.base_layer
        while isinstance(module, LoRAParameter):
            depth, module = depth + 1, module.base_layer
        return "base_layer." * depth + self.parameter_name

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``W + s B A`` per expert for a base weight of the parameter's shape (:class:`Mergeable`)."""
        with torch.no_grad():
            return (weight.float() + self.delta_weight().float().to(weight.device)).to(weight.dtype)

    def merge(self) -> None:
        if self.merged:
            raise RuntimeError("this adapter is already merged; call unmerge() first.")
        param = self._param()
        with torch.no_grad():
            param.copy_(self.merged_weight(param))
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError("this adapter is not merged; nothing to unmerge.")
        param = self._param()
        with torch.no_grad():
            param.sub_(self.delta_weight().to(param.dtype))
        self.merged = False

    # ------------------------------------------------------------------ forward
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.merged or self.disabled:
            if self.merged and self.disabled:
                raise RuntimeError("a merged adapter cannot be disabled; use lightning_zenft.disable_adapters(model).")
            return self.base_layer(*args, **kwargs)
        param = self._param()
        adapted = param + self.delta_weight().to(param.dtype)  # the weight stack, during this call only
        return functional_call(self.base_layer, {self._path(): adapted}, args, kwargs, strict=False)

    def extra_repr(self) -> str:
        return (
            f"parameter={self.parameter_name!r}, experts={self.num_experts}, in_features={self.in_features}, "
            f"out_features={self.out_features}, r={self.r}, alpha={self.alpha:g}, merged={self.merged}"
        )

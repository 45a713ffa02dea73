"""``FusedKernels``: fused LoRA kernels and Liger kernels on the user's model, one switch per kernel.

Applied at ``on_fit_start``, after the adapters are injected (``setup``) and the base is quantized and sharded (the
strategy's setup), and undone at ``teardown``. Nothing it does changes a parameter or a ``state_dict`` key, so
checkpoints are the same with and without it. Every layer or module that cannot take a kernel keeps its own forward
and is named in a warning with the reason.

Switches:

* ``lora``: each LoRA layer runs :func:`~lightning_zenft.kernels.fused_lora` (any device; Triton on CUDA).
* ``shared_input``: sibling LoRA layers seen reading the same tensor during the first training batch (q/k/v) run as
  one function that saves that input once.
* ``mlp``: gated MLPs (``down(act(gate(x)) * up(x))``, SiLU or GELU) with LoRA on all three projections run as one
  function that saves each adapted input once; ``mlp_recompute=True`` recomputes the down projection's input in
  backward instead of keeping it (``tokens x intermediate`` less memory per layer, one more elementwise pass).
* ``glu``: gated MLPs of plain linear layers use the fused GLU kernel.
* ``matmul_backend``: the back end of the fused LoRA products (``"auto"``, ``"torch"``, ``"triton"``,
  ``"triton-tma"``; see :mod:`lightning_zenft.kernels.matmul`). ``None`` takes the default runtime's, as set by
  :func:`~lightning_zenft.kernels.set_matmul_backend`. The callback owns its back-end choices and buffers
  (``callback.runtime``), created when fitting starts.
* ``rms_norm``, ``rope``, ``fused_linear_cross_entropy``: Liger-Kernel's kernels. ``"auto"`` turns each on when
  ``liger_kernel`` imports and the Trainer runs on CUDA, and says so in an info line otherwise; ``True`` requires
  them (an error names ``pip install liger-kernel``). A LoRA on the output head keeps its gradient under the fused
  cross-entropy.
"""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from lightning_zenft.adapters import find_adapters
from lightning_zenft.fusion import (
    LigerPatches,
    apply_liger,
    finalize_shared_inputs,
    fuse_glu_mlps,
    fuse_lora_layers,
    restore_liger,
    unfuse_lora_layers,
)
from lightning_zenft.kernels._triton import interpret_mode
from lightning_zenft.kernels.liger import liger_available, require_liger
from lightning_zenft.kernels.runtime import BACKENDS, EpilogueBackend, KernelRuntime, default_runtime

Switch = bool | Literal["auto"]
_LIGER = ("rms_norm", "rope", "fused_linear_cross_entropy")


class FusedKernels(Callback):
    """Apply fused kernels to the LightningModule's model at fit start (see the module docstring).

    Args:
        lora: fused per-layer LoRA kernel.
        shared_input: one call for sibling LoRA layers reading the same input.
        mlp: one call for a gated MLP with LoRA on gate, up and down.
        mlp_recompute: the fused MLP recomputes ``act(gate) * up`` in backward rather than keeping it.
        glu: fused GLU kernel for gated MLPs without LoRA.
        matmul_backend: back end of the fused products; None follows ``set_matmul_backend``.
        rms_norm, rope, fused_linear_cross_entropy: Liger kernels; ``"auto"``, ``True`` or ``False``.

    Example::

        trainer = L.Trainer(callbacks=[LoRA(r=16, alpha=32), FusedKernels(rope=False)])
    """

    def __init__(
        self,
        lora: bool = True,
        shared_input: bool = True,
        mlp: bool = True,
        glu: bool = True,
        mlp_recompute: bool = False,
        matmul_backend: EpilogueBackend | None = None,
        rms_norm: Switch = "auto",
        rope: Switch = "auto",
        fused_linear_cross_entropy: Switch = "auto",
    ) -> None:
        liger = {"rms_norm": rms_norm, "rope": rope, "fused_linear_cross_entropy": fused_linear_cross_entropy}
        for name, value in liger.items():
            if value not in (True, False, "auto"):
                raise ValueError(f"FusedKernels({name}={value!r}): use True, False or 'auto'.")
        if matmul_backend is not None and matmul_backend not in BACKENDS:
            raise ValueError(f"FusedKernels(matmul_backend={matmul_backend!r}): use one of {', '.join(BACKENDS)}.")
        if (shared_input or mlp) and not lora:
            raise ValueError(
                "FusedKernels(lora=False) with shared_input or mlp on: the grouped kernels are built on the per-layer "
                "one; set lora=True, or turn shared_input and mlp off too."
            )
        self.lora = lora
        self.shared_input = shared_input
        self.mlp = mlp
        self.glu = glu
        self.mlp_recompute = mlp_recompute
        self.matmul_backend = matmul_backend
        self.runtime: KernelRuntime = default_runtime().derive(backend=matmul_backend)
        self.liger: dict[str, Switch] = liger
        self._patches: LigerPatches | None = None
        self._pending_groups = False
        self._choices_logged = False
        self.applied: dict[str, list[str]] = {}

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if any(v is True for v in self.liger.values()):
            require_liger()  # fail before any work when an explicitly requested dependency is missing

    def _liger_switches(self, trainer: pl.Trainer) -> dict[str, bool]:
        on_cuda = trainer.strategy.root_device.type == "cuda"
        have = liger_available()
        chosen = {}
        for name, value in self.liger.items():
            if value is True and not (on_cuda or interpret_mode()):
                raise ValueError(
                    f"FusedKernels({name}=True): Liger kernels need a CUDA device but the Trainer runs on "
                    f"{trainer.strategy.root_device}; set {name}=False or 'auto'."
                )
            chosen[name] = value is True or (value == "auto" and have and on_cuda)
        auto_off = [n for n, v in self.liger.items() if v == "auto" and not chosen[n]]
        if auto_off:
            why = "liger_kernel is not installed (pip install liger-kernel)" if not have else "no CUDA device"
            rank_zero_info(f"FusedKernels: Liger kernels {', '.join(auto_off)} are off: {why}.")
        return chosen

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.applied = {}
        self.runtime = default_runtime().derive(backend=self.matmul_backend)  # fresh choices and buffers per fit
        self._choices_logged = False
        if self.lora:
            report = fuse_lora_layers(
                pl_module,
                mlp=self.mlp,
                shared_input=self.shared_input,
                mlp_recompute=self.mlp_recompute,
                runtime=self.runtime,
            )
            self.applied["lora"] = report.layers
            self.applied["mlp"] = report.mlps
            if not any(True for _ in find_adapters(pl_module)):
                warnings.warn(
                    f"FusedKernels: {type(pl_module).__name__} holds no adapter layer, so no fused LoRA kernel runs "
                    "and every weight trains (a full fine-tune). Put an adapter callback (e.g. LoRA(...)) in the "
                    "Trainer's callbacks, or FusedKernels(lora=False, shared_input=False, mlp=False) for the other "
                    "kernels only.",
                    stacklevel=2,
                )
            self._pending_groups = bool(report.observed_parents)
            rank_zero_info(f"FusedKernels: {report.summary()}.")
        if self.glu:
            self.applied["glu"] = fuse_glu_mlps(pl_module, runtime=self.runtime)
        liger = self._liger_switches(trainer)
        if any(liger.values()):
            self._patches = apply_liger(pl_module, **liger)
            for name in _LIGER:
                self.applied[name] = self._patches.names(name)
            self.applied["rope"] = [f"{m.__name__}.{n}" for m, n, _ in self._patches.functions]

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: object, batch: object, batch_idx: int
    ) -> None:
        if self._pending_groups:
            self._pending_groups = False
            groups = finalize_shared_inputs(pl_module)
            self.applied["shared_input"] = [",".join(g) for g in groups]
            rank_zero_info(f"FusedKernels: {len(groups)} groups of LoRA layers share their input.")
        if not self._choices_logged and self.lora and (choices := self.runtime.choices_report()):
            self._choices_logged = True
            won = Counter(choices.values())
            rank_zero_info(f"FusedKernels: back ends timed per product shape: {dict(won)} (runtime.choices_report()).")

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if trainer.state.fn == "fit":  # Lightning skips teardown when fit raises: restore the model here
            self.teardown(trainer, pl_module, "fit")

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self._patches is not None:
            restore_liger(self._patches)
            self._patches = None
        unfuse_lora_layers(pl_module)
        self.runtime.release_buffers()

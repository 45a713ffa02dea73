"""The sharded strategies on one CUDA device: FSDP1 (which needs CUDA) and what FSDP2 does only there.

    python tests/strategies/fsdp_gpu_run.py OUT_DIR

One process (world size 1): every code path of sharding, checkpoints and gathering runs, with one shard. Used by
``test_fsdp_gpu.py``.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from fsdp_run import fit, global_losses, lora, trained  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from lightning_zenft import FusedKernels, SaveAdapter  # noqa: E402
from lightning_zenft.strategies import FSDP1Strategy, FSDP2Strategy  # noqa: E402


def gpu_fit(root: Path, steps: int, callbacks: list, strategy: type | None, ckpt: Path | None = None, **kw: Any):
    return fit(1, root, steps, callbacks, ckpt, accelerator="gpu", strategy=strategy, **kw)


def main() -> None:
    out = Path(sys.argv[1])
    results: dict[str, Any] = {}
    plain, _ = gpu_fit(out / "plain", 4, [lora()], None)  # no strategy: the reference
    results["plain"] = global_losses(plain)
    for name, cls in (("fsdp1", FSDP1Strategy), ("fsdp2", FSDP2Strategy)):
        straight, t = gpu_fit(out / f"{name}-straight", 4, [lora(), SaveAdapter(str(out / f"{name}-adapter"))], cls)
        entry: dict[str, Any] = {"straight": global_losses(straight), "params": trained(straight)}
        if name == "fsdp1":
            entry["mixed_units"] = list(t.strategy.plan.mixed)
            entry["units"] = len(t.strategy.plan.names)
        for kind in ("sharded", "full"):
            saver = ModelCheckpoint(dirpath=out / f"{name}-ckpt-{kind}", every_n_train_steps=2, save_top_k=-1)
            first, _ = gpu_fit(out / f"{name}-{kind}", 2, [lora(), saver], cls, state_dict=kind)
            (ckpt,) = sorted((out / f"{name}-ckpt-{kind}").glob("*.ckpt"))
            resumed, _ = gpu_fit(out / f"{name}-{kind}", 4, [lora()], cls, ckpt=ckpt, state_dict=kind)
            entry[kind] = {"first": global_losses(first), "resumed": global_losses(resumed), "path": str(ckpt)}
        options = {"mixed_precision": "bf16", "activation_checkpointing": True, "cpu_offload": True}
        heavy, _ = gpu_fit(out / f"{name}-bf16", 4, [lora()], cls, **options)
        entry["bf16_offload_ac"] = global_losses(heavy)
        results[name] = entry
    full_plain, _ = gpu_fit(out / "full-plain", 3, [], None, optimizer="sgd")
    full_fsdp1, _ = gpu_fit(out / "full-fsdp1", 3, [], FSDP1Strategy, optimizer="sgd")
    results["full"] = {"plain": global_losses(full_plain), "fsdp1": global_losses(full_fsdp1)}
    kernels = FusedKernels()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused, _ = gpu_fit(out / "fused", 4, [lora(), kernels], FSDP2Strategy)
    results["fused"] = {
        "losses": global_losses(fused),
        "applied": {k: list(v) for k, v in kernels.applied.items()},
        "warnings": [str(w.message) for w in caught if "fused" in str(w.message).lower()],
    }
    torch.save(results, out / "results.pt")


if __name__ == "__main__":
    main()

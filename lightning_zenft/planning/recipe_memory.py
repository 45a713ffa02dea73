"""The memory side of a recommendation: which method fits, with the figures of ``zenft estimate``.

One memory model serves both commands: ``recommend`` calls :func:`~lightning_zenft.planning.memory.estimate_memory`
with the settings the written config runs with (:func:`estimate_settings`: per GPU, every method sharded over all
``nodes * gpus`` GPUs as ``zenft estimate --gpus`` assumes, LoRA/QLoRA in bf16 with the recommended dropout, full
fine-tuning in bf16 mixed precision) and reports, for each figure, the ``zenft estimate`` command that prints it.

The choice, once a GPU memory is given (a method fits when its estimate is at most 90% of it): the rule's method
first, then the cheaper ones (full -> LoRA -> QLoRA), then the same with gradient checkpointing if it was off. QLoRA
is chosen only where this installation has the 4-bit plugin (``lightning_zenft.NF4Precision``); otherwise the reason
says that QLoRA would have been the pick and what is recommended instead. When nothing runnable fits, the option
closest to fitting is returned with ``fits=False`` and what to change.

Example::

    choice = choose_by_memory(resolve_model("7B"), "lora", 64, 24.0, 1, 2048, 1, False, can_qlora=False)
    choice.method, choice.checkpointing, choice.fits
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

from lightning_zenft.planning.memory import estimate_memory
from lightning_zenft.planning.model_info import ModelInfo

__all__ = [
    "LORA_DROPOUT",
    "MEMORY_HEADROOM",
    "MemoryChoice",
    "choose_by_memory",
    "estimate_command",
    "estimate_settings",
    "nf4_precision_available",
]

MEMORY_HEADROOM = 0.9
"""Share of the GPU memory a run may use (the rest: CUDA context, allocator fragmentation, transient buffers)."""
LORA_DROPOUT = 0.05
"""The adapter dropout a recommendation writes (and estimates with)."""
_PRECISION = {"full": "mixed", "lora": "bf16", "qlora": "bf16"}
_LABEL = {"full": "full fine-tuning", "lora": "the bf16 base with LoRA", "qlora": "QLoRA"}
_GIB = 1024**3


def _gib(value: int) -> str:
    return f"{value / _GIB:.1f} GiB"


def nf4_precision_available() -> bool:
    """Whether this installation exports the 4-bit plugin ``lightning_zenft.NF4Precision`` (QLoRA needs it).

    Example::

        >>> isinstance(nf4_precision_available(), bool)
        True
    """
    import lightning_zenft

    return hasattr(lightning_zenft, "NF4Precision")


def estimate_settings(
    method: str, rank: int, batch: int, seq: int, gpus: int, checkpointing: bool
) -> dict[str, object]:
    """The :func:`~lightning_zenft.planning.memory.estimate_memory` keywords of a method in a recommended run.

    Example::

        >>> estimate_settings("lora", 16, 1, 2048, 8, False)["precision"]
        'bf16'
    """
    settings: dict[str, object] = {"batch": batch, "seq": seq, "gpus": gpus, "checkpointing": checkpointing}
    settings["precision"] = _PRECISION[method]
    if method != "full":
        settings.update(rank=rank, lora_dropout=LORA_DROPOUT, target_modules="all-linear")
    return settings


def estimate_command(model: str, method: str, settings: dict[str, object]) -> str:
    """The ``zenft estimate`` command line that prints the figure of ``estimate_memory(model, method, **settings)``.

    Example::

        >>> estimate_command("7B", "full", estimate_settings("full", 16, 1, 2048, 16, False))
        'zenft estimate --model 7B --method full --batch 1 --seq 2048 --gpus 16 --precision mixed'
    """
    parts = ["zenft", "estimate", "--model", model, "--method", method]
    parts += ["--batch", str(settings["batch"]), "--seq", str(settings["seq"]), "--gpus", str(settings["gpus"])]
    parts += ["--precision", str(settings["precision"])]
    if method != "full":
        parts += ["--rank", str(settings["rank"]), "--lora-dropout", f"{settings['lora_dropout']:g}"]
    if settings["checkpointing"]:
        parts.append("--checkpointing")
    return " ".join(shlex.quote(part) for part in parts)


@dataclass(frozen=True)
class MemoryChoice:
    """The method and checkpointing memory allows, with the figures behind it.

    Example::

        >>> from lightning_zenft.planning.model_info import resolve_model
        >>> choose_by_memory(resolve_model("7B"), "lora", 64, None, 1, 2048, 1, False, False).fits is None
        True
    """

    method: str
    checkpointing: bool
    fits: bool | None
    """``None`` when no GPU memory was given."""
    memory_bytes: dict[str, int]
    """Per-GPU total of each method under the chosen checkpointing."""
    commands: dict[str, str]
    """The ``zenft estimate`` command of each figure."""
    reason: str
    notes: list[str] = field(default_factory=list)
    """Why the method moved away from the rule's choice."""


def choose_by_memory(
    info: ModelInfo,
    method: str,
    rank: int,
    gpu_mem_gb: float | None,
    batch: int,
    seq: int,
    gpus: int,
    checkpointing: bool,
    can_qlora: bool,
) -> MemoryChoice:
    """Check the rule's ``method`` against the GPU memory and move to a cheaper one (module docstring) if needed.

    ``gpus`` is the total (``nodes * gpus``): every method is sharded over all of them.
    """
    figures: dict[tuple[str, bool], int] = {}

    def memory(name: str, ckpt: bool) -> int:
        if (name, ckpt) not in figures:
            settings = estimate_settings(name, rank, batch, seq, gpus, ckpt)
            figures[name, ckpt] = estimate_memory(info, name, **settings).total_bytes  # type: ignore[arg-type]
        return figures[name, ckpt]

    fits: bool | None = None
    notes: list[str] = []
    chosen, use_ckpt = method, checkpointing
    if gpu_mem_gb is not None:
        budget = MEMORY_HEADROOM * gpu_mem_gb * _GIB
        chain = ["full", "lora", "qlora"] if method == "full" else ["lora", "qlora"]
        tries = [(name, checkpointing) for name in chain] + ([] if checkpointing else [(m, True) for m in chain])
        runnable = [(m, ck) for m, ck in tries if m != "qlora" or can_qlora]
        pick = next(((m, ck) for m, ck in runnable if memory(m, ck) <= budget), None)
        first_fit = next(((m, ck) for m, ck in tries if memory(m, ck) <= budget), None)
        for m, ck in tries:
            if (m, ck) in (pick, first_fit):
                break
            extra = " with gradient checkpointing" if ck and not checkpointing else ""
            notes.append(
                f"{_LABEL[m]}{extra} needs {_gib(memory(m, ck))} per GPU over {gpus} GPU(s), more than "
                f"{MEMORY_HEADROOM:.0%} of {gpu_mem_gb:g} GiB: it does not fit"
            )
        if first_fit is not None and first_fit != pick:  # QLoRA would be the pick, but it cannot run here
            notes.append(
                f"a 4-bit base (QLoRA) would fit ({_gib(memory(*first_fit))}) and would be the pick, but this "
                "lightning_zenft has no NF4Precision plugin to run it"
            )
        fits = pick is not None
        if pick is None:
            pick = min(runnable, key=lambda option: memory(*option))
            notes.append(
                f"nothing this lightning_zenft can run fits: even {_LABEL[pick[0]]}"
                f"{' with gradient checkpointing' if pick[1] else ''} needs {_gib(memory(*pick))}; lower the batch "
                "or sequence length, or use more GPUs"
                + ("" if can_qlora else ", or a lightning_zenft with the NF4Precision plugin (QLoRA)")
            )
        elif pick != (method, checkpointing):
            how = " with gradient checkpointing (turned on in the config)" if pick[1] and not checkpointing else ""
            verb = "falling back to" if pick[0] != method else "keeping"
            notes.append(f"{verb} {_LABEL[pick[0]]}{how}, which needs {_gib(memory(*pick))} and fits")
        chosen, use_ckpt = pick
    memory_bytes = {name: memory(name, use_ckpt) for name in ("full", "lora", "qlora")}
    commands = {
        name: estimate_command(info.name, name, estimate_settings(name, rank, batch, seq, gpus, use_ckpt))
        for name in ("full", "lora", "qlora")
    }
    assumed = (
        f"batch {batch} x seq {seq}, checkpointing {'on' if use_ckpt else 'off'}, sharded over {gpus} GPU(s), "
        f"LoRA/QLoRA in bf16 with dropout {LORA_DROPOUT:g}"
    )
    summary = ", ".join(f"{name} {_gib(value)}" for name, value in memory_bytes.items())
    if gpu_mem_gb is None:
        reason = f"no GPU memory given, fit not checked; per-GPU estimates ({assumed}): {summary}"
    else:
        reason = (
            f"per-GPU estimates ({assumed}) against {MEMORY_HEADROOM:.0%} of {gpu_mem_gb:g} GiB: {summary}; "
            f"{chosen} {'fits' if fits else 'does NOT fit'}"
        )
    return MemoryChoice(chosen, use_ckpt, fits, memory_bytes, commands, reason, notes)

r"""Training memory estimate for a Llama-like decoder: weights, gradients, optimizer states, activations.

Static memory in bytes per parameter (``G`` GPUs under FSDP; ``b4`` is the NF4 size in bits, below):

=============  =====================================  ======================  ================================
precision      full fine-tuning                       frozen base (LoRA)      4-bit base (QLoRA)
=============  =====================================  ======================  ================================
``mixed``      2 (bf16 weight) + 2 (bf16 grad)        2                       ``b4 / 8`` per linear weight,
               + 4 (fp32 master) + 4 s (fp32 states)                          2 for the other weights
``bf16``       2 + 2 + 2 s                            2                       ``b4 / 8``, 2 for the others
``fp32``       4 + 4 + 4 s                            4                       ``b4 / 8``, 4 for the others
=============  =====================================  ======================  ================================

``s`` is the number of optimizer states per parameter: 2 for AdamW (``exp_avg``, ``exp_avg_sq``), 1 for SGD
with momentum. With ``mixed`` precision and AdamW that is ``2 + 2 + 4 + 8 = 16`` bytes per parameter, so a 7B
full fine-tune holds 112e9 bytes (104.3 GiB) before activations; SGD with momentum needs 12. In the "copies of
the model" view with ``B`` bytes per value, Adam keeps four copies (``4NB``: weights, gradients, two states) and
SGD three (weights, gradients, one momentum; ``2NB`` without the gradient). Adapter parameters are counted like full
fine-tuning weights, except that under ``mixed`` they are held in fp32 (``4 + 4 + 4 s``). Under FSDP the
weights, gradients and optimizer states are sharded: each GPU holds ``1 / G`` of them.

Under FSDP (``G > 1``, as :class:`~lightning_zenft.strategies.FSDP2Strategy` runs it with ``mixed_precision="bf16"``)
full fine-tuning keeps no persistent bf16 copy: the sharded fp32 parameter is the master weight, gradients are
reduced into fp32 shards, so ``mixed`` splits its 16 bytes as 4 (weights) + 4 (gradients) + ``4 s`` (states), each
over ``G``; frozen weights are stored in bf16 (2 bytes over ``G``) and adapters in fp32, as above. FSDP also holds
some parameters whole for a while (``gathered_bytes``, not sharded): the root unit (embeddings, final norm, output
head) from forward to backward, the decoder block being computed and the next one it prefetches, in the compute
dtype (the 4-bit size for a 4-bit base's linear weights), plus the whole gradients of one block's trained parameters
before they are reduced. Measured per rank on CPU runs of 2 processes, the parameter, gradient and optimizer shards
equal these figures, and the parameters held whole at a block's forward or backward equal the root unit plus one
block (the prefetched block is not visible there).

The 4-bit NF4 base stores ``b4 = 4 + 8/64 + 32/(64*256) = 4.127`` bits per weight: 4-bit codes, one 8-bit
absmax per block of 64 weights, and (double quantization) one fp32 scale per 256 absmax values. Only the
decoder's linear weights are quantized; embeddings, lm_head and norms stay in the compute dtype.

Activations (what autograd saves for backward) for batch ``b``, sequence ``s``, hidden ``h``, MLP width ``i``,
``a`` query and ``k`` key/value heads of size ``d``, vocabulary ``V``, activation bytes ``e`` (2 for bf16, 4
for fp32), one decoder layer of the eager Llama block with SDPA / flash attention (no ``s^2`` term: the
kernel keeps ``q, k, v``, its output and an fp32 log-sum-exp of ``b*a*s`` values, never the score matrix)::

    RMSNorm (x2)    4bsh (input upcast to fp32) + 4bs (rsqrt) [+ e*bsh normalized input, only when the
                    norm weight is trained]
    norm outputs    e*bsh each, saved by the next linear layers (full FT) or by the adapters' low-rank path
                    (LoRA: even with a frozen base, x @ A^T needs x to compute dA)
    attention       e*bs*(a*d + 2*k*d + a*d) + 4*b*a*s      (q, k after RoPE, v, output, log-sum-exp)
    SwiGLU MLP      4 * e*bsi                                (gate output, silu(gate), up output, their product)
    LoRA            e*bs*r per adapted linear (x @ A^T, kept for dB); with dropout the adapter keeps its own
                    dropped copy of the input (for dA) instead of the shared input, plus the mask where the
                    input itself needs a gradient (not q/k/v of the first layer, fed by the frozen embedding):
                    (e + m)*bs*in per adapted linear, where the mask takes m = 1 byte on CUDA (fused dropout
                    kernel) and m = e on CPU (a mask in the input dtype); o_proj's copy and mask come on top of
                    the attention output that attention keeps anyway

Per layer with full fine-tuning this is ``bs*((8 + 4e)*h + e*(2*a*d + 2*k*d) + 4e*i) + 8bs + 4bas``. A frozen
base drops the two ``e*bsh`` normalized-input terms and saves linear inputs only for adapted layers; the first
norm of the first layer saves nothing, as the frozen embedding output needs no gradient. A 4-bit base saves
the same activations as LoRA: its matmul keeps the layer input, the storage the adapter already keeps.

Outside the layers: the final norm (as above), the lm_head input (``e*bsh``, full FT only), RoPE ``cos, sin``
(``2*e*s*d``, once), token ids (``8bs``, full FT only) and the loss: the fp32 log-softmax of the logits
(``4*b*s*V``) plus the int64 labels (``8bs``).

With gradient checkpointing at decoder-layer granularity each layer keeps only its input (``e*bsh``); during
backward one layer is recomputed, so the peak is ``L*e*bsh + one layer + outside``. Activations are not
sharded by FSDP. Transient buffers (the bf16 logits before the fp32 upcast, gradient buckets, allocator
slack) are not counted; keep some headroom.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal, get_args

from lightning_zenft.planning.model_info import LINEAR_NAMES, ModelInfo, resolve_model

__all__ = ["MemoryEstimate", "estimate_memory", "resolve_target_modules"]

Method = Literal["full", "lora", "qlora"]
Device = Literal["cuda", "cpu"]
Optimizer = Literal["adamw", "sgd"]
Precision = Literal["mixed", "bf16", "fp32"]

NF4_BITS_PER_WEIGHT = 4 + 8 / 64 + 32 / (64 * 256)
"""4-bit codes + 8-bit absmax per 64 weights + fp32 second-level scale per 256 absmax values."""

_STATES_PER_PARAM: dict[str, int] = {"adamw": 2, "sgd": 1}
_ACT_BYTES: dict[str, int] = {"mixed": 2, "bf16": 2, "fp32": 4}
_TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "all-linear": LINEAR_NAMES,
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}
_GIB = 1024**3


def resolve_target_modules(target_modules: str | Sequence[str]) -> tuple[str, ...]:
    """Expand a preset (``"all-linear"``, ``"attention"``, ``"mlp"``) or a list of layer names.

    Example::

        >>> resolve_target_modules("attention")
        ('q_proj', 'k_proj', 'v_proj', 'o_proj')
    """
    if isinstance(target_modules, str):
        if target_modules in _TARGET_PRESETS:
            return _TARGET_PRESETS[target_modules]
        names = [part.strip() for part in target_modules.split(",") if part.strip()]
    else:
        names = list(target_modules)
    unknown = [name for name in names if name not in LINEAR_NAMES]
    if unknown or not names:
        raise ValueError(
            f"target_modules={target_modules!r} names no known layer ({unknown or 'empty'}). Use a preset "
            f"({', '.join(_TARGET_PRESETS)}) or names among {', '.join(LINEAR_NAMES)}."
        )
    return tuple(name for name in LINEAR_NAMES if name in names)


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-GPU training memory, in bytes, with its parts.

    Example::

        >>> est = estimate_memory("7B", "full", batch=1, seq=512)
        >>> est.weights_bytes + est.gradients_bytes + est.optimizer_bytes
        112000000000
    """

    model: str
    method: str
    batch: int
    seq: int
    rank: int | None
    gpus: int
    checkpointing: bool
    optimizer: str
    precision: str
    n_params: int
    trainable_params: int
    weights_bytes: int
    """Weights held for compute: bf16/fp32 base (4-bit for QLoRA) plus adapters, sharded over ``gpus``."""
    gradients_bytes: int
    optimizer_bytes: int
    """Optimizer states, plus fp32 master weights under ``mixed`` full fine-tuning."""
    activations_bytes: int
    """Peak of what autograd saves for backward (not sharded)."""
    layer_activation_bytes: int
    """What one decoder layer saves without checkpointing (the average over layers)."""
    head_activation_bytes: int
    """What is saved outside the decoder layers: embeddings, final norm, lm_head, loss."""
    checkpoint_bytes: int
    """Layer inputs kept under gradient checkpointing (0 without it)."""
    gathered_bytes: int = 0
    """Under FSDP (``gpus > 1``): parameters and gradients held whole while units are computed (see the module
    docstring); 0 on one GPU."""

    @property
    def static_bytes(self) -> int:
        """Weights, gradients and optimizer states."""
        return self.weights_bytes + self.gradients_bytes + self.optimizer_bytes

    @property
    def total_bytes(self) -> int:
        """Per-GPU total: static memory, what FSDP holds whole, and activations."""
        return self.static_bytes + self.gathered_bytes + self.activations_bytes

    def to_dict(self) -> dict[str, object]:
        """Plain dict (JSON-ready) including ``total_bytes`` and ``static_bytes``."""
        out: dict[str, object] = asdict(self)
        out["static_bytes"] = self.static_bytes
        out["total_bytes"] = self.total_bytes
        return out

    def format(self) -> str:
        """A small table in GiB (2^30 bytes) for printing; ``to_dict`` has the bytes.

        Example::

            >>> print(estimate_memory("7B", "full").format().splitlines()[-1])
              total per GPU     116.35 GiB
        """
        rank = f", rank {self.rank}" if self.rank is not None else ""
        lines = [
            f"{self.method} on {self.model} ({self.n_params / 1e9:.2f}B params, {self.trainable_params:,} trainable"
            f"{rank}), batch {self.batch} x seq {self.seq}, {self.optimizer}, {self.precision} precision, "
            f"{self.gpus} GPU(s), checkpointing {'on' if self.checkpointing else 'off'}; GiB = 2^30 bytes",
        ]
        for label, value in (
            ("weights", self.weights_bytes),
            ("gradients", self.gradients_bytes),
            ("optimizer", self.optimizer_bytes),
            ("activations", self.activations_bytes),
            *([("gathered (FSDP)", self.gathered_bytes)] if self.gpus > 1 else []),
            ("total per GPU", self.total_bytes),
        ):
            lines.append(f"  {label:<14} {value / _GIB:9.2f} GiB")
        return "\n".join(lines)


def _norm_bytes(bs: int, h: int, e: int, trained_weight: bool) -> int:
    return 4 * bs * h + 4 * bs + (e * bs * h if trained_weight else 0)


def _layer_bytes(
    info: ModelInfo,
    b: int,
    s: int,
    e: int,
    full: bool,
    targets: tuple[str, ...],
    rank: int,
    dropout: float,
    mask_bytes: int,
    live_in: bool,
    fused: str | None = None,
) -> tuple[int, bool]:
    """Saved bytes of one decoder layer and whether its output needs a gradient (see the module docstring).

    ``fused``: None (eager adapter layers), ``"keep"`` or ``"recompute"`` (``FusedKernels`` with that MLP mode).
    """
    bs, h, i = b * s, info.hidden_size, info.intermediate_size
    q_width, kv_width = info.num_heads * info.head_dim, info.num_kv_heads * info.head_dim
    shapes = info.linear_shapes()
    adapted = set(targets) if not full else set()

    def saved_inputs(names: tuple[str, ...], width: int, input_live: bool) -> int:
        if full:
            return e * bs * width  # one tensor shared by the layers reading it
        hit = [name for name in names if name in adapted]
        if not hit:
            return 0
        if dropout > 0 and fused is None:
            # each adapter keeps its dropped copy (for dA); the mask only when the input itself needs a gradient
            return len(hit) * (e + (mask_bytes if input_live else 0)) * bs * width
        return e * bs * width  # fused kernels keep a seed, not a mask, and one input per group

    total = 0
    if live_in:
        total += _norm_bytes(bs, h, e, full)
    total += saved_inputs(("q_proj", "k_proj", "v_proj"), h, live_in)
    attn_live = live_in or bool(adapted & {"q_proj", "k_proj", "v_proj"})
    if attn_live:
        total += e * bs * (2 * q_width + 2 * kv_width) + 4 * b * info.num_heads * s
        if dropout > 0 and fused is None and not full:
            total += saved_inputs(("o_proj",), q_width, True)  # its dropped copy and mask, beside the kept output
    elif "o_proj" in adapted:
        total += saved_inputs(("o_proj",), q_width, False)  # not shared with a saved attention output
    mid_live = attn_live or "o_proj" in adapted
    if mid_live:
        total += _norm_bytes(bs, h, e, full)
    total += saved_inputs(("gate_proj", "up_proj"), h, mid_live)
    gate_live = mid_live or "gate_proj" in adapted
    up_live = mid_live or "up_proj" in adapted
    if gate_live:
        total += 2 * e * bs * i  # silu input, and the up output saved by the product
    fused_mlp = fused is not None and {"gate_proj", "up_proj", "down_proj"} <= adapted
    if up_live and not fused_mlp:
        total += e * bs * i  # silu output saved by the product (the fused MLP recomputes it)
    if fused_mlp and fused == "recompute":
        pass  # act(gate) * up is recomputed in backward, not kept for down's adapter
    else:
        total += saved_inputs(("down_proj",), i, gate_live or up_live)
    total += sum(e * bs * rank for name in shapes if name in adapted)
    return total, mid_live or gate_live or up_live or "down_proj" in adapted


def estimate_memory(
    model: str | os.PathLike[str] | ModelInfo,
    method: Method,
    batch: int = 1,
    seq: int = 2048,
    rank: int = 16,
    gpus: int = 1,
    checkpointing: bool = False,
    optimizer: Optimizer = "adamw",
    precision: Precision = "mixed",
    target_modules: str | Sequence[str] = "all-linear",
    lora_dropout: float = 0.0,
    device: Device = "cuda",
    fused_kernels: bool = False,
    mlp_recompute: bool = False,
) -> MemoryEstimate:
    """Estimate per-GPU training memory (formulas in the module docstring).

    Args:
        model: a Hugging Face model directory or a size string such as ``"7B"``.
        method: ``"full"``, ``"lora"`` (frozen base in the compute dtype) or ``"qlora"`` (4-bit NF4 base).
        batch: micro-batch size per GPU.
        seq: tokens per sequence.
        rank: LoRA rank, for the adapter size and the low-rank activations; not used by full fine-tuning
            (reported as ``None`` there).
        gpus: GPUs the static memory is sharded over (FSDP).
        checkpointing: gradient checkpointing per decoder layer.
        optimizer: ``"adamw"`` (2 states) or ``"sgd"`` (momentum, 1 state).
        precision: ``"mixed"`` (bf16 compute, fp32 master weights and states), ``"bf16"`` or ``"fp32"``.
        target_modules: adapted layers for LoRA/QLoRA: a preset or layer names (not used by full fine-tuning).
        lora_dropout: adapter dropout probability, which changes what the adapters save (LoRA/QLoRA only).
        device: where training runs; it only sets the dropout mask size (1 byte per element on CUDA, the
            activation dtype on CPU).
        fused_kernels: the adapters run ``FusedKernels``' functions: no dropout copies or masks, and a gated MLP with
            all three projections adapted keeps ``gate``, ``up`` and ``act(gate) * up`` but not ``act(gate)``.
        mlp_recompute: with ``fused_kernels``, the fused MLP recomputes ``act(gate) * up`` instead of keeping it.

    Example::

        >>> est = estimate_memory("1.1B", "lora", batch=4, seq=2048, rank=16)
        >>> print(est.format())  # doctest: +SKIP
    """
    problems = []
    if method not in get_args(Method):
        problems.append(f"method={method!r} (use one of {', '.join(get_args(Method))})")
    if optimizer not in _STATES_PER_PARAM:
        problems.append(f"optimizer={optimizer!r} (use one of {', '.join(_STATES_PER_PARAM)})")
    if precision not in _ACT_BYTES:
        problems.append(f"precision={precision!r} (use one of {', '.join(_ACT_BYTES)})")
    for name, value in (("batch", batch), ("seq", seq), ("gpus", gpus)):
        if not isinstance(value, int) or value < 1:
            problems.append(f"{name}={value!r} (must be a positive integer)")
    if method != "full" and (not isinstance(rank, int) or rank < 1):
        problems.append(f"rank={rank!r} (must be a positive integer for {method})")
    if device not in get_args(Device):
        problems.append(f"device={device!r} (use one of {', '.join(get_args(Device))})")
    if not 0.0 <= lora_dropout < 1.0:
        problems.append(f"lora_dropout={lora_dropout!r} (must be in [0, 1))")
    if problems:
        raise ValueError("Invalid memory estimate arguments: " + "; ".join(problems) + ".")

    info = resolve_model(model)
    full = method == "full"
    targets = () if full else resolve_target_modules(target_modules)
    e = _ACT_BYTES[precision]
    states = _STATES_PER_PARAM[optimizer]
    n = info.n_params

    # Static memory.
    if full:
        trainable = n
        if precision == "mixed" and gpus > 1:
            weights, grads, opt = 4 * n, 4 * n, 4 * states * n  # FSDP: the fp32 shard is the master weight
        elif precision == "mixed":
            weights, grads, opt = 2 * n, 2 * n, (4 + 4 * states) * n
        else:
            weights, grads, opt = e * n, e * n, e * states * n
    else:
        shapes = info.linear_shapes()
        trainable = info.num_layers * sum(rank * (fan_in + fan_out) for name, (fan_in, fan_out) in shapes.items()
                                          if name in targets)  # fmt: skip
        adapter_bytes = 4 if precision == "mixed" else e
        if method == "lora":
            base = e * n
        else:
            base = round(info.linear_params * NF4_BITS_PER_WEIGHT / 8) + e * (n - info.linear_params)
        weights = base + adapter_bytes * trainable
        grads = adapter_bytes * trainable
        opt = adapter_bytes * states * trainable

    # Activations.
    b, s, h, d = batch, seq, info.hidden_size, info.head_dim
    mask_bytes = 1 if device == "cuda" else e
    live = full
    layer_sum, layer_max = 0, 0
    for _ in range(info.num_layers):
        fused = None if full or not fused_kernels else ("recompute" if mlp_recompute else "keep")
        saved, live = _layer_bytes(info, b, s, e, full, targets, rank, lora_dropout, mask_bytes, live, fused)
        layer_sum += saved
        layer_max = max(layer_max, saved)
    head = 0
    if live:
        head += 2 * e * s * d  # RoPE cos and sin
        head += _norm_bytes(b * s, h, e, full)  # final norm
        head += 4 * b * s * info.vocab_size + 8 * b * s  # fp32 log-softmax and labels
        if full:
            head += e * b * s * h + 8 * b * s  # lm_head input, token ids
    if checkpointing:
        ckpt = info.num_layers * e * b * s * h
        activations = ckpt + layer_max + head
    else:
        ckpt = 0
        activations = layer_sum + head

    return MemoryEstimate(
        model=info.name,
        method=method,
        batch=batch,
        seq=seq,
        rank=None if full else rank,
        gpus=gpus,
        checkpointing=checkpointing,
        optimizer=optimizer,
        precision=precision,
        n_params=n,
        trainable_params=trainable,
        weights_bytes=_ceil_div(weights, gpus),
        gradients_bytes=_ceil_div(grads, gpus),
        optimizer_bytes=_ceil_div(opt, gpus),
        activations_bytes=activations,
        layer_activation_bytes=layer_sum // max(info.num_layers, 1),
        head_activation_bytes=head,
        checkpoint_bytes=ckpt,
        gathered_bytes=_gathered_bytes(info, method, targets, rank, e) if gpus > 1 else 0,
    )


def _gathered_bytes(info: ModelInfo, method: str, targets: tuple[str, ...], rank: int, e: int) -> int:
    """What FSDP holds whole: the root unit, two decoder blocks in the compute dtype (``e`` bytes; 4-bit linear weights
    for QLoRA) and one block's trained gradients (module docstring)."""
    h = info.hidden_size
    block_linear = info.linear_params // max(info.num_layers, 1)
    adapters = sum(rank * (i + o) for name, (i, o) in info.linear_shapes().items() if name in targets)
    linear_bytes = round(block_linear * NF4_BITS_PER_WEIGHT / 8) if method == "qlora" else e * block_linear
    block = linear_bytes + e * (2 * h + adapters)
    root = e * (info.embedding_params + h)
    trained = e * (block_linear + 2 * h) if method == "full" else e * adapters
    return root + 2 * block + trained


def _ceil_div(value: int, parts: int) -> int:
    return -(-value // parts)

"""Test helpers: tiny random `transformers` models of several architectures, and a minimal LightningModule."""

from __future__ import annotations

import os
import warnings

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*token_id must be.*")

VOCAB = 128

SESSION_ONLY = ("TRITON_INTERPRET", "PL_GLOBAL_SEED", "PL_SEED_WORKERS")
"""Variables the test session sets for itself (Triton's interpreter for the kernel tests, where a module-level switch
keeps every other test on the torch path; Lightning's global seed after a ``zenft`` command ran): a process a test
launches must not inherit them, or it would compute (and seed) differently from the test's own reference."""


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a process a test launches: this one's without :data:`SESSION_ONLY`, plus ``extra``."""
    return {k: v for k, v in os.environ.items() if k not in SESSION_ONLY} | extra


def drop_session_env() -> None:
    """Before spawning workers (they inherit ``os.environ``): the autouse fixture in conftest.py restores it."""
    for key in SESSION_ONLY:
        os.environ.pop(key, None)


def tiny_config(arch: str):
    """A transformers config for a tiny model of the given architecture (random init, a few thousand params)."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
    if arch == "llama":
        return tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_key_value_heads=2, **common)
    if arch == "mistral":
        return tf.MistralConfig(hidden_size=32, intermediate_size=64, num_key_value_heads=2, **common)
    if arch == "qwen2":
        return tf.Qwen2Config(hidden_size=32, intermediate_size=64, num_key_value_heads=2, **common)
    if arch == "gemma":
        return tf.GemmaConfig(hidden_size=32, intermediate_size=64, num_key_value_heads=2, head_dim=8, **common)
    if arch == "phi":
        return tf.PhiConfig(hidden_size=32, intermediate_size=64, **common)
    if arch == "gpt2":
        return tf.GPT2Config(
            n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0
        )
    raise ValueError(arch)


def tiny_model(arch: str = "llama", seed: int = 0) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch))
    return model.float().eval()


def load_base(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def token_batch(n: int = 2, t: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, t), generator=g)


class TinyLM(L.LightningModule):
    """A causal-LM LightningModule written the way users write theirs: AdamW over `self.parameters()`."""

    def __init__(self, arch: str = "llama", seed: int = 0, lr: float = 1e-2, build_in_configure_model: bool = False):
        super().__init__()
        self.arch, self.seed, self.lr = arch, seed, lr
        self.build_in_configure_model = build_in_configure_model
        self.model = None if build_in_configure_model else tiny_model(arch, seed)
        self.losses: list[float] = []

    def configure_model(self) -> None:
        if self.model is None:
            self.model = tiny_model(self.arch, self.seed)

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        loss = self.model(input_ids=ids, labels=ids).loss
        self.losses.append(loss.item())
        return loss

    def validation_step(self, batch, batch_idx):
        (ids,) = batch
        self.log("val_loss", self.model(input_ids=ids, labels=ids).loss)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)

    def train_dataloader(self):
        return DataLoader(TensorDataset(token_batch(16, 12, seed=3)), batch_size=4, shuffle=False)

    def val_dataloader(self):
        return DataLoader(TensorDataset(token_batch(4, 12, seed=4)), batch_size=4)


def make_trainer(tmp_path, callbacks, **kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_steps=4,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        deterministic=True,
    )
    defaults.update(kwargs)
    return L.Trainer(callbacks=callbacks, **defaults)


# ------------------------------------------------------------------------------------------- kernel parity helpers
def close(
    got: torch.Tensor | None,
    want: torch.Tensor | None,
    dtype: torch.dtype,
    what: str,
    fp32_tol: float = 2e-5,
    low_tol: float = 3e-2,
) -> None:
    """``got`` (computed in ``dtype``) against an fp32 reference, tolerance scaled to the values' magnitude."""
    assert got is not None and want is not None, f"{what}: missing gradient"
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    scale = want.float().abs().max().clamp_min(1.0)
    tol = fp32_tol if dtype == torch.float32 else low_tol
    err = (got.float() - want.float()).abs().max()
    assert err <= tol * scale, f"{what}: max error {err.item():.3g} > {tol * scale.item():.3g}"


def leaf(*shape: int, dtype: torch.dtype, grad: bool = True, scale: float = 1.0) -> torch.Tensor:
    """A random leaf tensor in ``dtype`` (requiring grad unless ``grad=False``)."""
    return (torch.randn(*shape) * scale).to(dtype).requires_grad_(grad)


def ref_copy(t: torch.Tensor | None) -> torch.Tensor | None:
    """An fp32 copy of ``t`` for a reference computation, requiring grad as ``t`` does."""
    return None if t is None else t.detach().float().requires_grad_(t.requires_grad)

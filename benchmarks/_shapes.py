"""The Llama shapes the benchmarks run (those of ``shared/bench/PEFT_BASELINE.md``), in one place.

LLAMA_SHAPES["8b"]["hidden_size"]           # LlamaConfig keyword arguments
layer_widths("1b")                          # (layers, hidden, intermediate, k/v width)
"""

from __future__ import annotations

LLAMA_SHAPES: dict[str, dict[str, int]] = {
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192),
    "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, max_position_embeddings=128),
}  # fmt: skip


def layer_widths(size: str) -> tuple[int, int, int, int]:
    """``(layers, hidden, intermediate, k/v width)`` of a shape; the k/v width is kv heads x head dim."""
    s = LLAMA_SHAPES[size]
    head_dim = s["hidden_size"] // s["num_attention_heads"]
    return s["num_hidden_layers"], s["hidden_size"], s["intermediate_size"], s["num_key_value_heads"] * head_dim

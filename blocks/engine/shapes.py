"""Named model shapes for benchmarks with ``load_format="dummy"`` (random weights, no download).

Each entry is a ``config.json`` dict with the published architecture numbers of that model, so a
benchmark at ``"llama-3-8b"`` moves the same bytes and FLOPs as the real checkpoint.
"""

from __future__ import annotations

from typing import Any

__all__ = ["MODEL_SHAPES", "shape_config"]

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

MODEL_SHAPES: dict[str, dict[str, Any]] = {
    "llama-3-8b": dict(
        architectures=["LlamaForCausalLM"], hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
        max_position_embeddings=8192, rms_norm_eps=1e-5, torch_dtype="bfloat16", tie_word_embeddings=False,
        bos_token_id=128000, eos_token_id=128001,
    ),
    "llama-3.1-8b": dict(
        architectures=["LlamaForCausalLM"], hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
        rope_scaling=_LLAMA3_ROPE, max_position_embeddings=131072, rms_norm_eps=1e-5, torch_dtype="bfloat16",
        tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
    ),
    "qwen2.5-0.5b": dict(
        architectures=["Qwen2ForCausalLM"], hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, rope_theta=1000000.0,
        max_position_embeddings=32768, rms_norm_eps=1e-6, torch_dtype="bfloat16", tie_word_embeddings=True,
        bos_token_id=151643, eos_token_id=151643,
    ),
    "qwen2.5-1.5b": dict(
        architectures=["Qwen2ForCausalLM"], hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, rope_theta=1000000.0,
        max_position_embeddings=32768, rms_norm_eps=1e-6, torch_dtype="bfloat16", tie_word_embeddings=True,
        bos_token_id=151643, eos_token_id=151643,
    ),
}


def shape_config(name: str) -> dict[str, Any]:
    """The config dict of a named shape (raises ``ValueError`` listing the known names)."""
    key = name.lower()
    if key not in MODEL_SHAPES:
        raise ValueError(f"unknown model shape {name!r}; known shapes: {', '.join(sorted(MODEL_SHAPES))}")
    return dict(MODEL_SHAPES[key])

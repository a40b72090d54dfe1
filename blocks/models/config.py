"""``ModelConfig``: what a model and the engine need from a Hugging Face ``config.json``.

The config is parsed as a plain dict so that both transformers 4.x files (``rope_theta``,
``rope_scaling``, ``torch_dtype``) and 5.x files (``rope_parameters``, ``dtype``) load without
depending on the installed transformers version.

The engine sizes the KV cache from ``num_layers``, ``num_kv_heads``, ``head_dim`` and
``max_model_len``: one layer holds ``2 * block_size * num_kv_heads * head_dim`` elements per block.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["ModelConfig", "parse_dtype", "DTYPES"]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def parse_dtype(value: Any, *, field_name: str = "dtype") -> torch.dtype:
    """``"float16"`` / ``"torch.float16"`` / ``torch.float16`` -> ``torch.float16`` (float32/16/bfloat16 only)."""
    if isinstance(value, torch.dtype):
        if value in DTYPES.values():
            return value
        value = str(value)
    key = str(value).removeprefix("torch.").lower()
    if key not in DTYPES:
        raise ValueError(f"{field_name} must be one of float32, float16, bfloat16, got {value!r}")
    return DTYPES[key]


def _rope_params(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, scaling dict or None) from either the 4.x or the 5.x layout."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and ("rope_theta" in params or "rope_type" in params):
        theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = float(cfg.get("rope_theta", 10000.0))
        scaling = dict(cfg.get("rope_scaling") or {})
    rope_type = scaling.get("rope_type", scaling.get("type")) or "default"
    if rope_type == "default":
        return theta, None
    scaling["rope_type"] = rope_type
    return theta, scaling


@dataclass
class ModelConfig:
    """Model hyper-parameters (sizes are totals over tensor-parallel ranks).

    Attributes:
        architecture: the ``architectures[0]`` entry (registry key), e.g. ``"LlamaForCausalLM"``.
        model_type: ``config.json``'s ``model_type`` (``"llama"``, ``"mistral"``, ``"qwen2"``, ...).
        vocab_size, hidden_size, intermediate_size: sizes.
        num_layers: decoder layers (``num_hidden_layers``).
        num_heads, num_kv_heads, head_dim: attention heads; ``num_kv_heads < num_heads`` is GQA/MQA.
        max_position_embeddings: the model's context length (``max_model_len`` default).
        norm_eps: RMSNorm/LayerNorm epsilon.
        hidden_act: activation name (``"silu"``, ``"relu"``, ...).
        rope_theta, rope_scaling: rotary base and scaling dict (``None`` = plain RoPE or no RoPE).
        tie_word_embeddings: LM head shares the embedding weight.
        qkv_bias, o_bias, mlp_bias: which projections have biases.
        qk_norm: per-head RMSNorm on q and k before RoPE (Qwen3).
        sliding_windows: per layer, the attention window or ``None``.
        dtype: the checkpoint's dtype (``torch_dtype`` / ``dtype``), float32 if absent.
        word_embed_proj_dim: OPT's embedding width (differs from ``hidden_size`` in opt-350m).
        do_layer_norm_before: OPT pre-norm (``False`` for opt-350m).
        final_layer_norm: OPT keeps a final LayerNorm (pre-norm models only).
        layer_norm_elementwise_affine: OPT LayerNorms have weight/bias.
        bos_token_id, eos_token_ids: special tokens (eos from ``generation_config.json`` if given).
        raw: the parsed ``config.json`` dict.
    """

    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_eps: float = 1e-6
    hidden_act: str = "silu"
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_windows: list[int | None] = field(default_factory=list)
    dtype: torch.dtype = torch.float32
    word_embed_proj_dim: int | None = None
    do_layer_norm_before: bool = True
    final_layer_norm: bool = True
    layer_norm_elementwise_affine: bool = True
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def max_model_len(self) -> int:
        """Longest sequence the model supports (``max_position_embeddings``)."""
        return self.max_position_embeddings

    def kv_bytes_per_block(self, block_size: int, dtype: torch.dtype) -> int:
        """Bytes one KV block takes over all layers (keys and values)."""
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_layers * block_size * self.num_kv_heads * self.head_dim * elem

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], *, generation_config: dict[str, Any] | None = None) -> ModelConfig:
        """Parse a ``config.json`` dict (transformers 4.x or 5.x layout).

        Raises:
            ValueError: a required field is missing or inconsistent (named in the message).
        """
        archs = cfg.get("architectures") or []
        if not archs:
            raise ValueError("config.json has no 'architectures' entry: cannot tell which model to build")
        model_type = cfg.get("model_type", "")
        is_opt = model_type == "opt" or archs[0].startswith("OPT")

        def need(key: str) -> Any:
            if cfg.get(key) is None:
                raise ValueError(f"config.json is missing required field {key!r} (architecture {archs[0]})")
            return cfg[key]

        hidden = int(need("hidden_size"))
        num_heads = int(need("num_attention_heads"))
        num_layers = int(need("num_hidden_layers"))
        if is_opt:
            num_kv = num_heads
        else:
            num_kv = int(cfg.get("num_key_value_heads") or num_heads)
        head_dim = cfg.get("head_dim")
        head_dim = int(head_dim) if head_dim else hidden // num_heads
        if num_heads % num_kv:
            raise ValueError(f"num_attention_heads ({num_heads}) must be a multiple of num_key_value_heads ({num_kv})")
        theta, scaling = _rope_params(cfg)
        default_act = "relu" if is_opt else "silu"
        dtype_value = cfg.get("dtype", cfg.get("torch_dtype")) or "float32"
        try:
            dtype = parse_dtype(dtype_value, field_name="config.json dtype")
        except ValueError:
            dtype = torch.float32
        eos = (generation_config or {}).get("eos_token_id", cfg.get("eos_token_id"))
        eos_ids = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
        out = cls(
            architecture=archs[0],
            model_type=model_type,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(cfg["ffn_dim"] if is_opt else need("intermediate_size")),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv,
            head_dim=head_dim,
            max_position_embeddings=int(cfg.get("max_position_embeddings") or 2048),
            norm_eps=float(cfg.get("rms_norm_eps", cfg.get("layer_norm_eps", 1e-5 if is_opt else 1e-6))),
            hidden_act=str(cfg.get("activation_function" if is_opt else "hidden_act") or default_act),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", is_opt)),
            dtype=dtype,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            raw=dict(cfg),
        )
        if is_opt:
            bias = bool(cfg.get("enable_bias", True))
            out.qkv_bias = out.o_bias = out.mlp_bias = bias
            out.word_embed_proj_dim = int(cfg.get("word_embed_proj_dim") or hidden)
            out.do_layer_norm_before = bool(cfg.get("do_layer_norm_before", True))
            out.final_layer_norm = out.do_layer_norm_before and not cfg.get("_remove_final_layer_norm", False)
            out.layer_norm_elementwise_affine = bool(cfg.get("layer_norm_elementwise_affine", True))
            out.rope_scaling = None
        else:
            out.qkv_bias = model_type == "qwen2" or bool(cfg.get("attention_bias", False))
            out.o_bias = model_type not in ("qwen2",) and bool(cfg.get("attention_bias", False))
            out.mlp_bias = bool(cfg.get("mlp_bias", False))
            out.qk_norm = model_type == "qwen3"
        out.sliding_windows = _sliding_windows(cfg, model_type, num_layers)
        return out


def _sliding_windows(cfg: dict[str, Any], model_type: str, num_layers: int) -> list[int | None]:
    window = cfg.get("sliding_window")
    if not window:
        return [None] * num_layers
    layer_types = cfg.get("layer_types")
    if layer_types:
        if len(layer_types) != num_layers:
            raise ValueError(f"layer_types has {len(layer_types)} entries but num_hidden_layers is {num_layers}")
        return [int(window) if t == "sliding_attention" else None for t in layer_types]
    if model_type in ("qwen2", "qwen3"):
        if not cfg.get("use_sliding_window", False):
            return [None] * num_layers
        first = int(cfg.get("max_window_layers", num_layers))
        return [int(window) if i >= first else None for i in range(num_layers)]
    if model_type == "mistral":
        return [int(window)] * num_layers
    return [None] * num_layers

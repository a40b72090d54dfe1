"""OPT (facebook/opt-125m ... 66b, including the opt-350m variant).

Differences from the Llama family: learned absolute positions (table row ``position + 2``),
LayerNorm with biases, ReLU MLP (``fc1``/``fc2``), biased projections, no RoPE, tied LM head.
opt-350m is post-norm (``do_layer_norm_before = False``, no final LayerNorm) and embeds in
``word_embed_proj_dim`` (512) with ``project_in``/``project_out`` to and from ``hidden_size`` (1024);
its ``forward`` therefore returns ``[T, word_embed_proj_dim]``, the width the LM head reads.

Checkpoint names are ``model.decoder.*`` (older uploads: ``decoder.*``); ``q_proj``/``k_proj``/
``v_proj`` are fused into ``self_attn.qkv_proj``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from blocks.attention.backend import AttentionBackend
from blocks.attention.metadata import AttentionMetadata
from blocks.layers.activation import get_act_fn
from blocks.layers.attention import Attention
from blocks.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from blocks.layers.linear import ColumnParallelLinear, QKVParallelLinear, ReplicatedLinear, RowParallelLinear
from blocks.layers.norm import LayerNorm
from blocks.layers.tp import TP_SINGLE, TPInfo
from blocks.models.base import CausalLM
from blocks.models.config import ModelConfig
from blocks.models.weights import load_named_weights

__all__ = ["OPTForCausalLM"]

POSITION_OFFSET = 2  # OPT's learned position table starts at row 2


class OPTDecoderLayer(nn.Module):
    """One OPT layer (pre-norm, or post-norm when ``do_layer_norm_before`` is false)."""

    def __init__(self, config: ModelConfig, *, backend: AttentionBackend, dtype: torch.dtype, tp: TPInfo) -> None:
        super().__init__()
        h, hd = config.hidden_size, config.head_dim
        self.pre_norm = config.do_layer_norm_before
        self.qkv_proj = QKVParallelLinear(h, hd, config.num_heads, config.num_heads, bias=config.qkv_bias,
                                          params_dtype=dtype, tp=tp)
        self.out_proj = RowParallelLinear(h, h, bias=config.o_bias, params_dtype=dtype, tp=tp)
        self.attn = Attention(self.qkv_proj.num_heads, hd, num_kv_heads=self.qkv_proj.num_kv_heads, backend=backend)
        affine = config.layer_norm_elementwise_affine
        self.self_attn_layer_norm = LayerNorm(h, elementwise_affine=affine, params_dtype=dtype)
        self.fc1 = ColumnParallelLinear(h, config.intermediate_size, bias=config.mlp_bias, params_dtype=dtype, tp=tp)
        self.fc2 = RowParallelLinear(config.intermediate_size, h, bias=config.mlp_bias, params_dtype=dtype, tp=tp)
        self.act = get_act_fn(config.hidden_act)
        self.final_layer_norm = LayerNorm(h, elementwise_affine=affine, params_dtype=dtype)

    def forward(self, hidden: torch.Tensor, kv_cache, metadata: AttentionMetadata) -> torch.Tensor:
        residual = hidden
        if self.pre_norm:
            hidden = self.self_attn_layer_norm(hidden)
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden))
        hidden = residual + self.out_proj(self.attn(q.contiguous(), k.contiguous(), v.contiguous(), kv_cache,
                                                    metadata))
        if not self.pre_norm:
            hidden = self.self_attn_layer_norm(hidden)
        residual = hidden
        if self.pre_norm:
            hidden = self.final_layer_norm(hidden)
        hidden = residual + self.fc2(self.act(self.fc1(hidden)))
        if not self.pre_norm:
            hidden = self.final_layer_norm(hidden)
        return hidden


class OPTDecoder(nn.Module):
    """Embeddings (tokens + learned positions), layers, final norm and projections."""

    def __init__(self, config: ModelConfig, *, backend: AttentionBackend, dtype: torch.dtype, tp: TPInfo) -> None:
        super().__init__()
        h, proj = config.hidden_size, config.word_embed_proj_dim or config.hidden_size
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, proj, params_dtype=dtype, tp=tp)
        self.embed_positions = VocabParallelEmbedding(config.max_position_embeddings + POSITION_OFFSET, h,
                                                      params_dtype=dtype, tp=TP_SINGLE)
        self.project_in = ReplicatedLinear(proj, h, params_dtype=dtype) if proj != h else None
        self.project_out = ReplicatedLinear(h, proj, params_dtype=dtype) if proj != h else None
        self.final_layer_norm = (LayerNorm(h, elementwise_affine=config.layer_norm_elementwise_affine,
                                           params_dtype=dtype) if config.final_layer_norm else None)
        self.layers = nn.ModuleList(OPTDecoderLayer(config, backend=backend, dtype=dtype, tp=tp)
                                    for _ in range(config.num_layers))

    def forward(self, input_ids, positions, kv_caches, metadata) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        if self.project_in is not None:
            hidden = self.project_in(hidden)
        hidden = hidden + self.embed_positions(positions + POSITION_OFFSET)
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden = layer(hidden, kv_cache, metadata)
        if self.final_layer_norm is not None:
            hidden = self.final_layer_norm(hidden)
        if self.project_out is not None:
            hidden = self.project_out(hidden)
        return hidden


class _OPTModel(nn.Module):
    def __init__(self, config, *, backend, dtype, tp) -> None:
        super().__init__()
        self.decoder = OPTDecoder(config, backend=backend, dtype=dtype, tp=tp)


class OPTForCausalLM(CausalLM):
    """OPT causal LM. Args as :class:`~blocks.models.llama.LlamaForCausalLM`."""

    stacked_params_mapping = [
        ("qkv_proj", "self_attn.q_proj", "q"),
        ("qkv_proj", "self_attn.k_proj", "k"),
        ("qkv_proj", "self_attn.v_proj", "v"),
    ]

    def __init__(self, config: ModelConfig, *, backend: AttentionBackend, dtype: torch.dtype = torch.float32,
                 tp: TPInfo | None = None) -> None:
        super().__init__(config, backend=backend, tp=tp)
        self.model = _OPTModel(config, backend=backend, dtype=dtype, tp=self.tp)
        width = config.word_embed_proj_dim or config.hidden_size
        self.lm_head = ParallelLMHead(config.vocab_size, width, params_dtype=dtype, tp=self.tp)
        if config.tie_word_embeddings:
            self.lm_head.tie_to(self.model.decoder.embed_tokens)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        """``[T]`` ids and positions -> ``hidden [T, word_embed_proj_dim]``."""
        self.check_inputs(input_ids, positions, kv_caches)
        return self.model.decoder(input_ids, positions, kv_caches, attn_metadata)

    def _rename(self, name: str) -> str | None:
        if name.startswith("decoder."):
            name = "model." + name
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            return None
        # our layers hold the projections directly (no self_attn submodule) except the fused qkv
        name = name.replace("self_attn.out_proj", "out_proj")
        return name

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load full Hugging Face tensors (``model.decoder.layers.0.self_attn.q_proj.weight``, ...)."""
        return load_named_weights(self, weights, stacked_params_mapping=self.stacked_params_mapping,
                                  rename=self._rename)

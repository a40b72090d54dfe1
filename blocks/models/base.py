"""What every model family shares: the forward contract, ``compute_logits`` and config accessors.

A model is built from a :class:`~blocks.models.config.ModelConfig` and an attention backend
chosen once (:func:`blocks.attention.backend.get_attention_backend`):

``model.forward(input_ids, positions, kv_caches, attn_metadata) -> hidden``
    ``input_ids [T]`` int64 and ``positions [T]`` int64 are the step's flattened tokens (all
    sequences back to back, in ``attn_metadata.query_start_loc`` order); ``kv_caches`` is one
    ``(key_cache, value_cache)`` pair per layer (views from
    :func:`blocks.cache.kv_tensors.layer_views`); returns ``hidden [T, H]`` in the model dtype,
    where ``H`` is the width the LM head reads (``hidden_size``, or OPT's ``word_embed_proj_dim``).

``model.compute_logits(hidden, logits_indices=None) -> [n, vocab_size]`` float32
    selects rows ``logits_indices [n]`` int64 (all rows when ``None``) and applies the LM head.
"""

from __future__ import annotations

import torch
from torch import nn

from blocks.attention.backend import AttentionBackend
from blocks.attention.metadata import AttentionMetadata
from blocks.layers.embedding import ParallelLMHead
from blocks.layers.tp import TP_SINGLE, TPInfo
from blocks.models.config import ModelConfig

__all__ = ["CausalLM"]


class CausalLM(nn.Module):
    """Base class of the model families (see the module docstring for the contract).

    Subclasses set ``self.lm_head`` (a :class:`ParallelLMHead`), implement ``forward`` and
    ``load_weights(weights) -> set[str]`` (the parameter names they filled).
    """

    #: (our fused parameter part, checkpoint part, shard id) rules for fused projections.
    stacked_params_mapping: list[tuple[str, str, str | int]] = []

    def __init__(self, config: ModelConfig, *, backend: AttentionBackend, tp: TPInfo | None = None) -> None:
        super().__init__()
        self.config = config
        self.attn_backend = backend
        self.tp = tp or TP_SINGLE
        self.lm_head: ParallelLMHead

    # The numbers the engine sizes the KV cache with (per rank for heads).
    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @property
    def num_kv_heads(self) -> int:
        """KV heads stored on this rank (replicated when there are fewer KV heads than ranks)."""
        return max(1, self.config.num_kv_heads // self.tp.size)

    @property
    def head_dim(self) -> int:
        return self.config.head_dim

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        raise NotImplementedError

    def check_inputs(self, input_ids: torch.Tensor, positions: torch.Tensor,
                     kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Validate the forward's inputs (shapes only; no host sync)."""
        if input_ids.dim() != 1 or positions.shape != input_ids.shape:
            raise ValueError(f"input_ids and positions must both be [T], got {tuple(input_ids.shape)} and "
                             f"{tuple(positions.shape)}")
        if len(kv_caches) != self.num_layers:
            raise ValueError(f"kv_caches must have one (key_cache, value_cache) per layer: expected "
                             f"{self.num_layers}, got {len(kv_caches)}")

    def compute_logits(self, hidden: torch.Tensor, logits_indices: torch.Tensor | None = None) -> torch.Tensor:
        """``hidden [T, H]`` -> logits ``[n, vocab_size]`` float32 for rows ``logits_indices [n]`` (all if None)."""
        if logits_indices is not None:
            hidden = hidden.index_select(0, logits_indices)
        return self.lm_head(hidden)

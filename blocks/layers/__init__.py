"""Model layers: TP-aware linear layers, norms, rotary embeddings, activations, embedding/LM head,
and the paged attention layer.

Every layer documents its shapes; tensor-parallel layers take ``tp=TPInfo(rank, size)`` and load
their shard from full checkpoint tensors via ``param.weight_loader(param, tensor, shard_id)``.
"""

from blocks.layers.activation import SiluAndMul, get_act_fn
from blocks.layers.attention import Attention
from blocks.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from blocks.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from blocks.layers.norm import LayerNorm, RMSNorm
from blocks.layers.rotary import RotaryEmbedding
from blocks.layers.tp import TPInfo

__all__ = [
    "Attention",
    "ColumnParallelLinear",
    "LayerNorm",
    "MergedColumnParallelLinear",
    "ParallelLMHead",
    "QKVParallelLinear",
    "RMSNorm",
    "ReplicatedLinear",
    "RotaryEmbedding",
    "RowParallelLinear",
    "SiluAndMul",
    "TPInfo",
    "VocabParallelEmbedding",
    "get_act_fn",
]

"""Token embedding and LM head, split over tensor-parallel ranks by vocabulary.

Rank ``r`` of ``tp`` holds vocabulary rows ``[r * V_r, (r + 1) * V_r)`` with
``V_r = ceil(vocab_size / tp)``; rows past ``vocab_size`` (padding on the last rank) are zero.

* :class:`VocabParallelEmbedding`: ``input_ids [T]`` int64 -> ``[T, embedding_dim]``. Each rank
  looks up the ids it owns (others give zeros) and the results are summed over ranks.
* :class:`ParallelLMHead`: ``hidden [n, embedding_dim]`` -> logits ``[n, vocab_size]`` float32;
  each rank computes its vocabulary slice, the slices are gathered and the padding dropped.
  ``tie_to(embedding)`` shares the embedding's weight (tied word embeddings).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from blocks.layers.fused import linear
from blocks.layers.tp import TP_SINGLE, TPInfo

__all__ = ["VocabParallelEmbedding", "ParallelLMHead"]


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows.

    Args:
        num_embeddings: vocabulary size.
        embedding_dim: width of each row.
        params_dtype: keyword-only parameter dtype.
        tp: tensor-parallel coordinates.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, params_dtype: torch.dtype | None = None,
                 tp: TPInfo | None = None) -> None:
        super().__init__()
        if num_embeddings <= 0 or embedding_dim <= 0:
            raise ValueError(f"num_embeddings and embedding_dim must be positive, got {num_embeddings}, "
                             f"{embedding_dim}")
        self.tp = tp or TP_SINGLE
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.num_embeddings_per_rank = -(-num_embeddings // self.tp.size)
        self.vocab_start = self.tp.rank * self.num_embeddings_per_rank
        self.vocab_end = min(self.vocab_start + self.num_embeddings_per_rank, num_embeddings)
        self.weight = nn.Parameter(torch.empty(self.num_embeddings_per_rank, embedding_dim, dtype=params_dtype),
                                   requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        """Copy this rank's rows of the full ``[num_embeddings, embedding_dim]`` table; zero the padding."""
        want = (self.num_embeddings, self.embedding_dim)
        if tuple(loaded.shape) != want:
            raise ValueError(f"shape mismatch: checkpoint has {tuple(loaded.shape)}, model expects {want}")
        n = self.vocab_end - self.vocab_start
        with torch.no_grad():
            param[:n].copy_(loaded[self.vocab_start : self.vocab_end])
            param[n:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``input_ids [...]`` int64 -> ``[..., embedding_dim]`` in the weight's dtype."""
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside[..., None], 0)
        return self.tp.all_reduce(out)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, tp={self.tp.rank}/{self.tp.size}"


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection to vocabulary logits, split by vocabulary rows like the embedding.

    Args:
        num_embeddings: vocabulary size.
        embedding_dim: hidden size it reads.
        bias: keyword-only, add a per-token bias ``[num_embeddings]`` (rare).
        params_dtype, tp: as :class:`VocabParallelEmbedding`.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, bias: bool = False,
                 params_dtype: torch.dtype | None = None, tp: TPInfo | None = None) -> None:
        super().__init__(num_embeddings, embedding_dim, params_dtype=params_dtype, tp=tp)
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(self.num_embeddings_per_rank, dtype=params_dtype),
                                     requires_grad=False)
            self.bias.weight_loader = self._bias_loader

    def _bias_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if tuple(loaded.shape) != (self.num_embeddings,):
            raise ValueError(f"shape mismatch: checkpoint has {tuple(loaded.shape)}, "
                             f"model expects {(self.num_embeddings,)}")
        n = self.vocab_end - self.vocab_start
        with torch.no_grad():
            param[:n].copy_(loaded[self.vocab_start : self.vocab_end])
            param[n:].zero_()

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        """Share ``embedding.weight`` (tied word embeddings); shapes must agree."""
        if embedding.weight.shape != self.weight.shape:
            raise ValueError(f"cannot tie LM head {tuple(self.weight.shape)} to embedding "
                             f"{tuple(embedding.weight.shape)}")
        self.weight = embedding.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden [n, embedding_dim]`` -> logits ``[n, num_embeddings]`` float32."""
        logits = linear(hidden, self.weight, self.bias)
        logits = self.tp.all_gather(logits, -1)
        return logits[..., : self.num_embeddings].float()

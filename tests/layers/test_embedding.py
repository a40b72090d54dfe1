"""Vocabulary-parallel embedding and LM head: tp_size=2 shards (odd vocab, padded last rank)."""

import pytest
import torch

from blocks.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from blocks.layers.tp import TPInfo

VOCAB, DIM = 37, 6


def _loaded(cls, table, rank=0, size=1, **kw):
    layer = cls(VOCAB, DIM, tp=TPInfo(rank, size), **kw)
    layer.weight.weight_loader(layer.weight, table)
    return layer


def test_embedding_shards_sum_to_full_lookup():
    table = torch.randn(VOCAB, DIM)
    ids = torch.randint(0, VOCAB, (29,))
    full = _loaded(VocabParallelEmbedding, table)
    torch.testing.assert_close(full(ids), table[ids])
    outs = []
    for rank in range(2):
        layer = VocabParallelEmbedding(VOCAB, DIM, tp=TPInfo(rank, 2, all_reduce_fn=lambda x: x))
        layer.weight.weight_loader(layer.weight, table)
        assert layer.weight.shape == (19, DIM)
        outs.append(layer(ids))
    torch.testing.assert_close(outs[0] + outs[1], table[ids])
    # the last rank's padding row is zero
    last = _loaded(VocabParallelEmbedding, table, 1, 2)
    assert torch.all(last.weight[-1] == 0)


def test_lm_head_shards_concatenate_to_full_logits_and_drop_padding():
    table = torch.randn(VOCAB, DIM)
    hidden = torch.randn(5, DIM)
    full = _loaded(ParallelLMHead, table)
    ref = hidden @ table.T
    out = full(hidden)
    assert out.dtype == torch.float32 and out.shape == (5, VOCAB)
    torch.testing.assert_close(out, ref)
    shards = [_loaded(ParallelLMHead, table, r, 2) for r in range(2)]
    slices = [torch.nn.functional.linear(hidden, s.weight) for s in shards]
    assert slices[0].shape[-1] == 19
    torch.testing.assert_close(torch.cat(slices, -1)[:, :VOCAB], ref)
    # through forward: the gather hook supplies rank 1's slice, the padding column is dropped
    rank0 = ParallelLMHead(VOCAB, DIM, tp=TPInfo(0, 2, all_gather_fn=lambda x, d: torch.cat([x, slices[1]], d)))
    rank0.weight.weight_loader(rank0.weight, table)
    torch.testing.assert_close(rank0(hidden), ref)


def test_tied_head_shares_the_embedding_weight():
    emb = _loaded(VocabParallelEmbedding, torch.randn(VOCAB, DIM))
    head = ParallelLMHead(VOCAB, DIM)
    head.tie_to(emb)
    assert head.weight is emb.weight
    with pytest.raises(ValueError, match="cannot tie"):
        ParallelLMHead(VOCAB, DIM + 1).tie_to(emb)


def test_shape_mismatch_names_both_shapes():
    emb = VocabParallelEmbedding(VOCAB, DIM)
    with pytest.raises(ValueError, match=r"\(36, 6\).*\(37, 6\)"):
        emb.weight.weight_loader(emb.weight, torch.randn(36, DIM))

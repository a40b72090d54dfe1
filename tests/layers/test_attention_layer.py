"""The attention layer over a paged cache equals dense causal attention on contiguous tensors."""

import random

import pytest
import torch

from blocks.attention.backend import get_attention_backend
from blocks.attention.metadata import plan_attention
from blocks.cache.kv_tensors import allocate_kv_cache, layer_views
from blocks.layers.attention import Attention

BLOCK = 16


def _dense(q, k, v, window=None):
    """q [L, H, D], k/v [L, KV, D] -> causal attention [L, H * D] in float64."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1).double(), v.repeat_interleave(group, 1).double()
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) / q.shape[-1] ** 0.5
    i, j = torch.arange(len(q))[:, None], torch.arange(len(q))[None]
    allowed = j <= i
    if window:
        allowed &= (i - j) < window
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v).reshape(len(q), -1)


@pytest.mark.parametrize("heads,kv_heads,window", [(4, 4, None), (6, 2, None), (4, 1, 5)])
def test_prefill_then_decode_over_shuffled_blocks_equals_dense(heads, kv_heads, window):
    hd, lens = 8, [1, 17, 33]
    blocks = list(range(1, 20))
    random.Random(1).shuffle(blocks)
    tables = [[blocks.pop() for _ in range(-(-(n + 2) // BLOCK))] for n in lens]
    kv = allocate_kv_cache(1, 20, BLOCK, kv_heads, hd, dtype=torch.float32)
    kv.normal_()  # garbage in unwritten slots must never be read
    cache = layer_views(kv)[0]
    layer = Attention(heads, hd, num_kv_heads=kv_heads, backend=get_attention_backend("torch"), sliding_window=window)
    total = [n + 2 for n in lens]
    q_all = [torch.randn(n, heads, hd) for n in total]
    k_all = [torch.randn(n, kv_heads, hd) for n in total]
    v_all = [torch.randn(n, kv_heads, hd) for n in total]
    # step 1: prefill every prompt; steps 2-3: one decode token each
    done = [0] * len(lens)
    for step in range(3):
        qlens = [lens[i] if step == 0 else 1 for i in range(len(lens))]
        md = plan_attention(qlens, [done[i] + qlens[i] for i in range(len(lens))], tables, BLOCK)
        sl = [slice(done[i], done[i] + qlens[i]) for i in range(len(lens))]
        out = layer(torch.cat([q_all[i][s] for i, s in enumerate(sl)]).flatten(1),
                    torch.cat([k_all[i][s] for i, s in enumerate(sl)]).flatten(1),
                    torch.cat([v_all[i][s] for i, s in enumerate(sl)]).flatten(1), cache, md)
        assert out.shape == (sum(qlens), heads * hd)
        rows = out.split(qlens)
        for i, s in enumerate(sl):
            ref = _dense(q_all[i][: s.stop], k_all[i][: s.stop], v_all[i][: s.stop], window)[s]
            torch.testing.assert_close(rows[i].double(), ref, atol=1e-5, rtol=1e-5)
            done[i] = s.stop


def test_invalid_head_counts_and_window():
    with pytest.raises(ValueError, match="num_kv_heads"):
        Attention(6, 8, num_kv_heads=4)
    with pytest.raises(ValueError, match="sliding_window"):
        Attention(4, 8, sliding_window=0)

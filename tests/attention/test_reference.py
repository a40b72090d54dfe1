"""The torch reference against dense causal attention on contiguous K/V."""

import random

import numpy as np
import pytest
import torch

from blocks.attention import reference
from blocks.attention.metadata import plan_attention, plan_attention_arrays
from blocks.cache.kv_tensors import allocate_kv_cache, layer_views


def _dense(q, k, v, scale, q_offset, window=None, soft_cap=None):
    # q [ql, H, D], k/v [L, Hkv, D]
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, 1).float()
    v = v.repeat_interleave(group, 1).float()
    s = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    if soft_cap:
        s = soft_cap * torch.tanh(s / soft_cap)
    qp = torch.arange(q.shape[0])[:, None] + q_offset
    kp = torch.arange(k.shape[0])[None, :]
    ok = kp <= qp
    if window:
        ok &= qp - kp < window
    s = s.masked_fill(~ok, float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2), (7, 1)])
@pytest.mark.parametrize("window,soft_cap", [(None, None), (5, None), (None, 3.0)])
def test_reference_matches_dense_attention_on_mixed_batch(num_heads, num_kv_heads, window, soft_cap):
    block_size, head_dim, num_blocks = 16, 32, 64
    pairs = [(1, 1), (1, 17), (15, 15), (16, 40), (17, 17), (5, 97), (1, 16)]  # (query_len, seq_len)
    ids = list(range(1, num_blocks))
    random.shuffle(ids)
    tables = []
    for _, sl in pairs:
        n = -(-sl // block_size)
        tables.append([ids.pop() for _ in range(n)])
    md = plan_attention([p[0] for p in pairs], [p[1] for p in pairs], tables, block_size)
    kv = allocate_kv_cache(1, num_blocks, block_size, num_kv_heads, head_dim, dtype=torch.float32)
    kv.normal_()
    key_cache, value_cache = layer_views(kv)[0]
    full_k = [torch.randn(sl, num_kv_heads, head_dim) for _, sl in pairs]
    full_v = [torch.randn(sl, num_kv_heads, head_dim) for _, sl in pairs]
    # cached prefixes written through the reference itself, by their slots
    for (_ql, sl), t, k, v in zip(pairs, tables, full_k, full_v):
        prefix = plan_attention([sl], [sl], [t], block_size)
        reference.reshape_and_cache(k, v, key_cache, value_cache, prefix.slot_mapping)
    num_tokens = sum(p[0] for p in pairs)
    query = torch.randn(num_tokens, num_heads, head_dim)
    scale = head_dim**-0.5
    out = reference.paged_attention(
        query, key_cache, value_cache, md, scale=scale, sliding_window=window, soft_cap=soft_cap
    )
    starts = md.query_start_loc.tolist()
    for i, (ql, sl) in enumerate(pairs):
        q = query[starts[i] : starts[i + 1]]
        want = _dense(q, full_k[i], full_v[i], scale, sl - ql, window, soft_cap)
        torch.testing.assert_close(out[starts[i] : starts[i + 1]], want, atol=1e-5, rtol=1e-5)


def test_slot_mapping_skips_minus_one_and_plan_checks_block_table():
    kv = allocate_kv_cache(1, 4, 4, 1, 2, dtype=torch.float32)
    kv.fill_(7.0)
    key_cache, value_cache = layer_views(kv)[0]
    k = torch.arange(4.0).view(2, 1, 2)
    reference.reshape_and_cache(k, k, key_cache, value_cache, torch.tensor([5, -1]))
    assert key_cache.view(16, 1, 2)[5].tolist() == [[0.0, 1.0]]
    assert (key_cache.view(16, 1, 2)[torch.arange(16) != 5] == 7.0).all()
    with pytest.raises(ValueError, match="cannot hold seq_len"):
        plan_attention([1], [9], [[1, 2]], 4)


def test_fp8_cache_round_trip_within_e4m3_precision():
    kv = allocate_kv_cache(1, 2, 4, 2, 8, dtype=torch.float8_e4m3fn)
    key_cache, value_cache = layer_views(kv)[0]
    k = torch.randn(3, 2, 8)
    scale = torch.tensor(0.05)
    reference.reshape_and_cache(k, k, key_cache, value_cache, torch.tensor([0, 1, 6]), k_scale=scale, v_scale=scale)
    back = key_cache.view(8, 2, 8)[[0, 1, 6]].float() * scale
    torch.testing.assert_close(back, k, atol=0.02, rtol=0.07)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plan_attention_arrays_equals_plan_attention(seed):
    rng = random.Random(seed)
    block_size = rng.choice([1, 4, 16])
    num_seqs = rng.randint(1, 9)
    qlens, slens, tables = [], [], []
    for _ in range(num_seqs):
        sl = rng.randint(0, 70)
        qlens.append(rng.randint(0, sl) if sl else 0)
        slens.append(sl)
        tables.append([rng.randrange(1, 500) for _ in range(-(-sl // block_size))])
    width = max(len(t) for t in tables) + rng.randint(0, 3)
    array = np.zeros((num_seqs, max(width, 1)), dtype=np.int32)
    for i, t in enumerate(tables):
        array[i, : len(t)] = t
    want = plan_attention(qlens, slens, tables, block_size, max_blocks_per_seq=max(width, 1))
    got = plan_attention_arrays(np.array(qlens), np.array(slens), array, block_size)
    for name in ("query_start_loc", "seq_lens", "block_table", "slot_mapping"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    # the slots, computed here one token at a time (the definition)
    slots = [t[p // block_size] * block_size + p % block_size
             for ql, sl, t in zip(qlens, slens, tables) for p in range(sl - ql, sl)]
    assert got.slot_mapping.tolist() == slots
    assert got.query_start_loc.tolist() == [sum(qlens[:i]) for i in range(num_seqs + 1)]
    assert (got.max_query_len, got.max_seq_len, got.num_decode_tokens) == (
        want.max_query_len, want.max_seq_len, want.num_decode_tokens)
    with pytest.raises(ValueError, match="cannot hold seq_len"):
        plan_attention_arrays(np.array([1]), np.array([block_size * 2 + 1]), np.ones((1, 2), np.int32), block_size)

"""Triton KV write and paged attention against the torch reference.

On a CPU machine the kernels run under ``TRITON_INTERPRET=1`` (set by tests/conftest.py) in fp32/fp16; on a
CUDA machine the same tests run compiled, and the ``gpu`` tests add bf16, FP8 KV and graph capture.
Caches are poisoned with NaN outside the written slots, so any read past a sequence shows up.
"""

from __future__ import annotations

import random

import pytest
import torch

from blocks.attention import reference
from blocks.attention.backend import get_attention_backend
from blocks.attention.triton_backend import TritonAttentionBackend
from blocks.attention.triton_paged import WALK_MIN_SEQ_LEN, TritonPlan, choose_config, physical_walk_table
from tests.attention.helpers import DECODE_PAIRS, FP8, MIXED_PAIRS, assert_close_no_nan, make_batch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def run_and_check(batch, dtype, *, backend=None, loose=1.0, whole_cache=True, **attn_kwargs):
    """Write K/V with the backend and the reference, compare caches, then attention outputs.

    ``whole_cache`` compares every cache element (catching stray writes); otherwise only the new
    tokens' slots are compared (huge caches).
    """
    backend = backend or TritonAttentionBackend()
    md = batch.metadata
    keep = md.slot_mapping >= 0
    slots = md.slot_mapping[keep]
    if whole_cache:
        ref_k, ref_v = batch.key_cache.clone(), batch.value_cache.clone()
        reference.reshape_and_cache(batch.key, batch.value, ref_k, ref_v, md.slot_mapping,
                                    k_scale=batch.k_scale, v_scale=batch.v_scale)
    backend.plan(md)
    backend.write_kv(batch.key, batch.value, batch.key_cache, batch.value_cache, md,
                     k_scale=batch.k_scale, v_scale=batch.v_scale)
    if whole_cache:
        pairs = ((batch.key_cache, ref_k), (batch.value_cache, ref_v))
    else:
        pairs = []
        for cache, new, sc in ((batch.key_cache, batch.key, batch.k_scale), (batch.value_cache, batch.value,
                                                                            batch.v_scale)):
            rows = torch.zeros_like(cache[:1, :1]).expand(len(slots), 1, *cache.shape[2:]).clone()
            reference.reshape_and_cache(new[keep], new[keep], rows.view(len(slots), 1, *cache.shape[2:]),
                                        rows.clone(), torch.arange(len(slots), device=cache.device),
                                        k_scale=sc, v_scale=sc)
            pairs.append((cache.view(-1, *cache.shape[2:])[slots], rows.view(len(slots), *cache.shape[2:])))
        ref_k, ref_v = batch.key_cache, batch.value_cache
    for got, want in pairs:
        torch.testing.assert_close(got, want, atol=0, rtol=0, equal_nan=True)
    scale = batch.query.shape[-1] ** -0.5
    out = backend.attend(batch.query, batch.key_cache, batch.value_cache, md, scale=scale,
                         k_scale=batch.k_scale, v_scale=batch.v_scale, **attn_kwargs)
    want = reference.paged_attention(batch.query.float(), ref_k, ref_v, md, scale=scale,
                                     k_scale=batch.k_scale, v_scale=batch.v_scale, **attn_kwargs)
    assert out.dtype == batch.query.dtype and out.shape == batch.query.shape
    assert_close_no_nan(out, want, dtype, loose=loose)
    return out


# Pairwise matrix: every (head_dim, block_size) pair once; over it the dtype, the GQA ratio (1/4/7),
# sliding window and soft-cap rotate so that every pair of (dtype, head_dim, block_size, GQA) values
# meets at least once. (dtype, head_dim, block_size, (num_heads, num_kv_heads), window, soft_cap)
HEAD_DIMS = (64, 80, 96, 128, 256)
BLOCK_SIZES = (16, 32, 64)
GQA = ((4, 4), (8, 2), (7, 1))
MATRIX = [
    ((torch.float32, torch.float16)[(3 * k + j) % 2], hd, bs, GQA[(j + k) % 3],
     (None, 7, None, 20)[(3 * k + j) % 4], (None, None, 5.0)[(k + 2 * j) % 3])
    for k, hd in enumerate(HEAD_DIMS)
    for j, bs in enumerate(BLOCK_SIZES)
]


@pytest.mark.parametrize("dtype,head_dim,block_size,heads,window,soft_cap", MATRIX)
def test_mixed_batch_matches_reference(dtype, head_dim, block_size, heads, window, soft_cap):
    batch = make_batch(MIXED_PAIRS, num_heads=heads[0], num_kv_heads=heads[1], head_dim=head_dim,
                       block_size=block_size, dtype=dtype, device=DEVICE)
    run_and_check(batch, dtype, sliding_window=window, soft_cap=soft_cap)


@pytest.mark.parametrize("num_splits", [1, 3, 7])
@pytest.mark.parametrize("dtype,heads,window", [(torch.float32, (8, 2), None), (torch.float16, (7, 1), 40)])
def test_decode_batch_with_forced_split_kv(num_splits, dtype, heads, window):
    batch = make_batch(DECODE_PAIRS, num_heads=heads[0], num_kv_heads=heads[1], head_dim=64, block_size=16,
                       dtype=dtype, device=DEVICE)
    run_and_check(batch, dtype, backend=TritonAttentionBackend(num_splits=num_splits), sliding_window=window)
    (launch,) = next(iter(batch.metadata.plan.launches.values()))
    cfg, workspace = launch.config, launch.workspace
    assert cfg.num_splits == num_splits and (workspace is not None) == (num_splits > 1)


@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("dtype,heads", [(torch.float32, (8, 2)), (torch.float16, (7, 1))])
def test_decode_in_physical_block_order_matches_reference(num_splits, dtype, heads):
    """The sorted walk (forced): every row's blocks read in physical order, its partial last block last;
    padding rows and tokens included. The same keys, so the reference's output."""
    pairs = [(1, 300), (1, 17), (1, 16), (1, 1), (1, 97), (1, 250)]
    batch = make_batch(pairs, num_heads=heads[0], num_kv_heads=heads[1], head_dim=64, block_size=16, dtype=dtype,
                       device=DEVICE, pad_rows=1, pad_tokens=1)
    backend = TritonAttentionBackend(num_splits=num_splits, sorted_walk=True)
    out = run_and_check(batch, dtype, backend=backend)
    walk = batch.metadata.plan.walk_table
    assert walk is not None and (out[len(pairs):] == 0).all()
    # the kernel reads the walk, not the block table: point row 0's first full block at the poisoned block 0
    walk[0, 0] = 0
    again = backend.attend(batch.query, batch.key_cache, batch.value_cache, batch.metadata,
                           scale=batch.query.shape[-1] ** -0.5)
    assert again[0].isnan().any() and not again[1:].isnan().any()
    # with a sliding window the walk is not used (its mask needs logical positions); still correct
    windowed = make_batch(pairs, num_heads=heads[0], num_kv_heads=heads[1], head_dim=64, block_size=16, dtype=dtype,
                          device=DEVICE)
    run_and_check(windowed, dtype, backend=TritonAttentionBackend(sorted_walk=True), sliding_window=40)
    assert windowed.metadata.plan.walk_table is None


@pytest.mark.parametrize("width", [12, 33, 300])
def test_physical_walk_table_sorts_full_blocks_and_keeps_the_last_block_last(width):
    rng = random.Random(width)
    block_size = 16
    seq_lens, rows = [], []
    for n_blocks in [width, 1, 5, 0, 7, width - 1]:
        ids = rng.sample(range(1, 1 << 20), n_blocks)
        rows.append(ids + [rng.randrange(1 << 20) for _ in range(width - n_blocks)])  # padding: any ids
        seq_lens.append(max(0, (n_blocks - 1) * block_size + rng.randint(1, block_size)) if n_blocks else 0)
    table = torch.tensor(rows, dtype=torch.int32, device=DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    walk = physical_walk_table(table, lens, block_size)
    want = reference.physical_walk_table(table, lens, block_size)
    assert walk.dtype == torch.int32 and walk.shape == table.shape
    for row, got, ref, sl in zip(rows, walk.tolist(), want.tolist(), seq_lens):
        n = -(-sl // block_size)  # entries past the row's last block are never read
        assert got[:n] == ref[:n]
        assert got[:max(n - 1, 0)] == sorted(row[:max(n - 1, 0)])  # full blocks by physical id
        assert got[max(n - 1, 0):n] == row[max(n - 1, 0):n]  # then the last block


def test_long_decode_plans_the_sorted_walk_and_prefill_does_not():
    kw = dict(num_heads=32, num_kv_heads=8, head_dim=128, num_sms=132, dtype=torch.bfloat16)
    assert choose_config(num_seqs=8, max_query_len=1, max_seq_len=WALK_MIN_SEQ_LEN, **kw).sorted_walk
    assert not choose_config(num_seqs=8, max_query_len=1, max_seq_len=WALK_MIN_SEQ_LEN - 1, **kw).sorted_walk
    assert not choose_config(num_seqs=64, max_query_len=1, max_seq_len=4 * WALK_MIN_SEQ_LEN, **kw).sorted_walk
    assert not choose_config(num_seqs=1, max_query_len=512, max_seq_len=32768, **kw).sorted_walk


def test_split_heuristic_picks_split_for_few_long_sequences():
    batch = make_batch([(1, 700), (1, 33)], num_heads=4, num_kv_heads=1, head_dim=64, block_size=32,
                       dtype=torch.float32, device=DEVICE)
    run_and_check(batch, torch.float32, soft_cap=4.0)
    cfg = next(iter(batch.metadata.plan.launches.values()))[0].config
    assert cfg.num_splits > 1 and cfg.block_q == 1


def test_mixed_batch_with_forced_split_and_strided_query():
    batch = make_batch(MIXED_PAIRS[:6], num_heads=8, num_kv_heads=2, head_dim=64, block_size=32,
                       dtype=torch.float32, device=DEVICE)
    # query as a view into a fused qkv projection: token stride > num_heads * head_dim
    fused = torch.randn(batch.query.shape[0], 12, 64, device=DEVICE)
    batch.query = fused[:, :8]
    run_and_check(batch, torch.float32, backend=TritonAttentionBackend(num_splits=4), sliding_window=9)


@pytest.mark.parametrize("dtype,heads", [(torch.float32, (8, 2)), (torch.float16, (7, 1))])
def test_mixed_batch_launches_its_leading_decode_rows_apart(dtype, heads):
    """Decode rows first (the engine's order): one launch with decode tiles (split-KV here: few long
    rows) and one with prefill tiles for the rest, a one-token row after a chunk and padding included."""
    pairs = [(1, 600), (1, 300), (1, 17), (5, 40), (1, 9), (16, 16)]
    batch = make_batch(pairs, num_heads=heads[0], num_kv_heads=heads[1], head_dim=64, block_size=16,
                       dtype=dtype, device=DEVICE, pad_rows=1, pad_tokens=2)
    assert batch.metadata.num_decode_tokens == 3
    out = run_and_check(batch, dtype)
    parts = next(iter(batch.metadata.plan.launches.values()))
    assert [(p.seq_start, p.num_seqs, p.tok_start, p.tok_end) for p in parts] == [(0, 3, 0, 3), (3, 4, 3, 27)]
    assert parts[0].config.block_q == 1 and parts[0].config.num_splits > 1 and parts[1].config.block_q > 1
    assert parts[0].one_token and not parts[1].one_token  # the decode part skips the sequence search
    assert (out[-2:] == 0).all()


def test_padding_rows_and_tokens_are_zero_and_unwritten():
    batch = make_batch([(3, 20), (1, 9)], num_heads=4, num_kv_heads=2, head_dim=64, block_size=16,
                       dtype=torch.float16, device=DEVICE, pad_rows=2, pad_tokens=3)
    batch.metadata.max_query_len = 3
    out = run_and_check(batch, torch.float16)
    assert (out[4:] == 0).all()  # 3 trailing padding tokens + nothing for the seq_len-0 rows
    decode = make_batch([(1, 20), (1, 40)], num_heads=4, num_kv_heads=2, head_dim=64, block_size=16,
                        dtype=torch.float32, device=DEVICE, pad_rows=1, pad_tokens=2)
    out = run_and_check(decode, torch.float32, backend=TritonAttentionBackend(num_splits=2))
    assert (out[2:] == 0).all() and (out[:2] != 0).any()
    assert not next(iter(decode.metadata.plan.launches.values()))[0].one_token  # a q_len-0 row: searched
    # a CUDA graph's padding: every row has one token, padded rows have seq_len 0 and slot -1
    graph = make_batch([(1, 20), (1, 40), (1, 33)], num_heads=4, num_kv_heads=2, head_dim=64, block_size=16,
                       dtype=torch.float32, device=DEVICE, pad_tokens=2)
    graph.metadata.seq_lens[2] = 0
    graph.metadata.slot_mapping[2] = -1
    out = run_and_check(graph, torch.float32, backend=TritonAttentionBackend(num_splits=2))
    assert next(iter(graph.metadata.plan.launches.values()))[0].one_token
    assert (out[2:] == 0).all() and (out[:2] != 0).all(dim=-1).any()


def test_huge_num_blocks_needs_int64_offsets():
    """Block ids whose element offsets pass 2**31, in a real (lazily paged, mostly untouched) cache."""
    if DEVICE == "cpu":
        block_size, num_kv_heads, head_dim = 16, 1, 64
    else:
        block_size, num_kv_heads, head_dim = 16, 8, 128
    num_blocks = 2**31 // (block_size * num_kv_heads * head_dim) + 64
    batch = make_batch([(1, 40), (3, 20)], num_heads=2 * num_kv_heads, num_kv_heads=num_kv_heads,
                       head_dim=head_dim, block_size=block_size, dtype=torch.float16, device=DEVICE,
                       num_blocks=num_blocks, poison=False)
    table = batch.metadata.block_table
    table[0, :3] = torch.tensor([num_blocks - 1, 5, num_blocks - 7], dtype=torch.int32)
    table[1, :2] = torch.tensor([num_blocks - 3, num_blocks // 2], dtype=torch.int32)
    # slots of the new tokens follow the rewritten tables
    bs = block_size
    slots = [int(table[0, 39 // bs]) * bs + 39 % bs] + [int(table[1, p // bs]) * bs + p % bs for p in (17, 18, 19)]
    batch.metadata.slot_mapping = torch.tensor(slots, dtype=torch.int64, device=DEVICE)
    for row, length in ((0, 39), (1, 17)):  # cached prefixes at their (huge) slots
        pos = torch.arange(length)
        prefix_slots = (table[row].long().cpu()[pos // bs] * bs + pos % bs).to(DEVICE)
        k = torch.randn(length, num_kv_heads, head_dim, dtype=torch.float16, device=DEVICE)
        reference.reshape_and_cache(k, -k, batch.key_cache, batch.value_cache, prefix_slots)
    assert int(table.max()) * bs * num_kv_heads * head_dim > 2**31
    out = run_and_check(batch, torch.float16, whole_cache=False)
    assert out.abs().sum() > 0


def test_fp8_kv_cache_with_fp16_queries():
    batch = make_batch(MIXED_PAIRS[:5], num_heads=8, num_kv_heads=2, head_dim=64, block_size=16,
                       dtype=torch.float16, device=DEVICE, cache_dtype=FP8)
    run_and_check(batch, torch.float16, loose=2.0)


def test_wrong_inputs_raise_before_launch():
    batch = make_batch([(2, 20)], num_heads=4, num_kv_heads=2, head_dim=64, block_size=16,
                       dtype=torch.float32, device=DEVICE)
    be = TritonAttentionBackend()
    md = be.plan(batch.metadata)
    kc, vc, q = batch.key_cache, batch.value_cache, batch.query
    with pytest.raises(ValueError, match="key_cache dtype"):
        be.attend(q.half(), kc, vc, md, scale=1.0)
    with pytest.raises(ValueError, match="value_cache dtype"):
        be.attend(q, kc, vc.half(), md, scale=1.0)
    with pytest.raises(ValueError, match="contiguous"):  # [num_blocks, num_kv_heads, block_size, D] transposed
        be.attend(q, kc.transpose(1, 2), vc.transpose(1, 2), md, scale=1.0)
    with pytest.raises(ValueError, match="num_heads"):
        be.attend(q[:, :3], kc, vc, md, scale=1.0)
    with pytest.raises(ValueError, match="FP8 KV cache needs k_scale"):
        be.attend(q, kc.to(FP8), vc.to(FP8), md, scale=1.0)
    with pytest.raises(ValueError, match="key_cache must be"):
        be.attend(q, kc[0], vc[0], md, scale=1.0)
    md.block_table = md.block_table[:, :1]
    with pytest.raises(ValueError, match="block_table is too narrow"):
        be.attend(q, kc, vc, md, scale=1.0)
    with pytest.raises(ValueError, match="slot_mapping must be int64"):
        bad = md.__class__(**{**md.__dict__, "slot_mapping": md.slot_mapping.int()})
        be.write_kv(batch.key, batch.value, kc, vc, bad)
    with pytest.raises(ValueError, match="key_cache dtype"):
        be.write_kv(batch.key.half(), batch.value.half(), kc, vc, md)


def test_backend_registry_and_plan_reuse_across_layers():
    be = get_attention_backend("triton")
    assert isinstance(be, TritonAttentionBackend)
    batch = make_batch(MIXED_PAIRS[:4], num_heads=4, num_kv_heads=4, head_dim=64, block_size=16,
                       dtype=torch.float32, device=DEVICE)
    out = run_and_check(batch, torch.float32, backend=be)
    plan = batch.metadata.plan
    assert isinstance(plan, TritonPlan) and len(plan.launches) == 1
    again = be.attend(batch.query, batch.key_cache, batch.value_cache, batch.metadata, scale=0.3)
    assert batch.metadata.plan is plan and len(plan.launches) == 1  # second "layer" reuses the plan
    assert not torch.equal(again, out)  # different scale, same plan

"""Host-side pieces: the launch-config heuristic, alignment hints, backend selection, random batches."""

from __future__ import annotations

import importlib.util
import random

import pytest
import torch

from blocks.attention.backend import get_attention_backend
from blocks.attention.triton_backend import TritonAttentionBackend
from blocks.attention.triton_paged import (
    MAX_SPLITS,
    MIN_SPLIT_TOKENS,
    ONE_STAGE_MAX_KEYS,
    SPLIT_TOKENS,
    _alignment,
    choose_config,
)
from tests.attention.helpers import make_batch
from tests.attention.test_triton_attention import DEVICE, run_and_check


def _cfg(num_seqs, max_query_len, max_seq_len, heads=(32, 8), head_dim=128, dtype=torch.bfloat16):
    return choose_config(num_seqs=num_seqs, max_query_len=max_query_len, max_seq_len=max_seq_len,
                         num_heads=heads[0], num_kv_heads=heads[1], head_dim=head_dim, num_sms=132, dtype=dtype)


@pytest.mark.parametrize("num_seqs,ctx", [(1, 300), (1, 4096), (1, 32768), (8, 32768), (16, 1000), (64, 4096),
                                          (256, 1024), (3, 100000), (4, 8192), (5, 8192), (12, 8192)])
def test_decode_split_heuristic_bounds(num_seqs, ctx):
    cfg = _cfg(num_seqs, 1, ctx)
    assert cfg.block_q == 1 and cfg.block_m >= 16
    assert 1 <= cfg.num_splits <= MAX_SPLITS
    if cfg.num_splits > 1:
        assert ctx // cfg.num_splits >= MIN_SPLIT_TOKENS  # no split shorter than 256 keys
        assert num_seqs * 8 < 2 * 132  # only when the programs would not fill the SMs twice
        # no third wave started just to fill the SMs (only the SPLIT_TOKENS cap may need more programs)
        assert num_seqs * 8 * cfg.num_splits <= 2 * 132 or cfg.num_splits == -(-ctx // SPLIT_TOKENS)
    if num_seqs * 8 >= 2 * 132:
        assert cfg.num_splits == 1


def test_short_splits_run_in_one_stage():
    """Splits of at most ONE_STAGE_MAX_KEYS keys (a few tiles) drop the pipeline's second stage; longer ones and
    unsplit launches keep it."""
    for num_seqs, ctx, stages in ((1, 4096, 1), (2, 4096, 1), (1, 2048, 1), (1, 32768, 2), (8, 32768, 2),
                                  (64, 4096, 2)):
        cfg = _cfg(num_seqs, 1, ctx)
        assert cfg.num_stages == stages, (num_seqs, ctx, cfg)
        if stages == 1:
            assert cfg.num_splits > 1 and -(-ctx // cfg.num_splits) <= ONE_STAGE_MAX_KEYS


def test_decode_tiles_follow_shared_memory():
    assert (_cfg(64, 1, 4096).block_n, _cfg(64, 1, 4096).num_stages) == (128, 2)  # 2 x 128 keys x 128 x K,V bf16
    small = choose_config(num_seqs=64, max_query_len=1, max_seq_len=4096, num_heads=32, num_kv_heads=8, head_dim=128,
                          num_sms=132, dtype=torch.bfloat16, smem_per_block=100 * 1024)
    assert (small.block_n, small.num_stages) == (64, 3)  # 128 KB would not fit
    assert _cfg(64, 1, 4096, head_dim=256).block_n == 32 and _cfg(64, 1, 4096, dtype=torch.float32).block_n == 32


def test_prefill_tiles_pack_the_query_heads_of_a_kv_head():
    for heads in ((32, 8), (28, 4), (8, 8), (64, 1)):
        group = heads[0] // heads[1]
        cfg = _cfg(4, 512, 2048, heads=heads)
        assert cfg.num_splits == 1 and cfg.block_q >= 1
        assert cfg.block_q * group <= cfg.block_m  # every packed row fits the tile
    wide = _cfg(4, 512, 2048, head_dim=256)
    assert wide.block_m == 64 and wide.block_n == 32  # shared memory of 256-wide tiles


def test_alignment_is_the_largest_power_of_two_dividing_all_strides():
    assert _alignment(128, 4096, 1024) == 16
    assert _alignment(80, 640) == 16
    assert _alignment(96, 8 * 96) == 16  # 96 = 32 * 3
    assert _alignment(72, 144) == 8
    assert _alignment(7) == 1


def test_backend_selection_and_cupy_is_optional():
    assert get_attention_backend("auto", "cpu").name == "torch"
    assert isinstance(get_attention_backend("auto", "cuda"), TritonAttentionBackend)
    with pytest.raises(ValueError, match="must be one of"):
        get_attention_backend("flash")
    import blocks.attention.cupy_kernels as kernels  # the CUDA source module needs no cupy

    assert "paged_decode_attention" in kernels.KERNEL_SOURCE
    if importlib.util.find_spec("cupy") is None:
        with pytest.raises(ValueError, match="cupy"):
            get_attention_backend("cupy")


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("group", [1, 2, 4, 7, 8, 16])
@pytest.mark.parametrize("element_size", [1, 2, 4])
def test_tiled_cupy_kernel_tiles_fit_its_reduction_and_shared_memory(head_dim, group, element_size):
    """Host-side plan of the tiled CUDA kernel (no cupy needed): the warp's (head, row) scores fill at most the 32
    lanes of its transpose reduction, in powers of two; the stages and the merge scratch fit the kernel's shared
    memory; MIN_BLOCKS blocks fit an H100 SM; consecutive dims only where a lane's share is one vector load."""
    import blocks.attention.cupy_kernels_tiled as tiled

    gp = tiled.group_pad(group)
    assert gp >= group and gp & (gp - 1) == 0 and gp < 2 * group
    if gp * -(-head_dim // 32) > tiled.MAX_GROUP_DIMS or (head_dim * element_size) % 16:
        pytest.skip("a layer the tiled kernel leaves to the scalar kernel or Triton")
    rows, stages, smem = tiled.tile_config(head_dim, group, element_size)
    assert rows & (rows - 1) == 0 and gp * rows <= 32
    stage = tiled.NUM_WARPS * rows * 2 * head_dim * element_size
    assert stage <= tiled.STAGE_BYTES or rows == 1
    assert 2 <= stages <= tiled.MAX_STAGES
    fp8_table = tiled.FP8_LUT_BYTES if element_size == 1 else 0
    assert stages == 2 or stages * stage + fp8_table <= tiled.SMEM_BYTES
    assert smem >= stages * stage + 4 * tiled.NUM_WARPS * rows * gp  # the stages, then each warp's probabilities
    assert smem >= 4 * tiled.NUM_WARPS * (2 * gp + group * head_dim)  # the warps' states, merged at the end
    assert tiled.MIN_BLOCKS * (smem + fp8_table + 1024) <= 228 * 1024  # 1 KB reserved a block on Hopper
    lane_bytes = head_dim // 32 * element_size
    assert tiled.consecutive_dims(head_dim, element_size) == (head_dim % 32 == 0 and lane_bytes & (lane_bytes - 1) == 0)
    assert "paged_decode_attention" in tiled.TILED_SOURCE and "merge_splits" in tiled.TILED_SOURCE


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_batches_match_reference(seed):
    rng = random.Random(seed)
    num_kv_heads = rng.choice([1, 2])
    group = rng.choice([1, 3, 4])
    pairs = []
    for _ in range(rng.randint(1, 6)):
        seq_len = rng.randint(1, 130)
        pairs.append((rng.choice([1, rng.randint(1, seq_len)]), seq_len))
    dtype = rng.choice([torch.float32, torch.float16])
    batch = make_batch(pairs, num_heads=num_kv_heads * group, num_kv_heads=num_kv_heads, head_dim=64,
                       block_size=rng.choice([16, 32]), dtype=dtype, device=DEVICE)
    window = rng.choice([None, rng.randint(1, 40)])
    splits = rng.choice([{}, {"num_splits": rng.randint(2, 5)}])
    run_and_check(batch, dtype, backend=TritonAttentionBackend(**splits), sliding_window=window)


@pytest.mark.parametrize("pairs", [[(1, 40), (1, 7), (1, 300)], [(9, 40), (1, 7), (33, 33)]], ids=["decode", "mixed"])
def test_mqa_group_of_16_and_strided_new_kv(pairs):
    """16 query heads on one KV head (tile rows = group); K/V views into a fused projection."""
    batch = make_batch(pairs, num_heads=16, num_kv_heads=1, head_dim=64, block_size=16, dtype=torch.float16,
                       device=DEVICE)
    fused = torch.randn(batch.key.shape[0], 3, 64, dtype=torch.float16, device=DEVICE)
    batch.key, batch.value = fused[:, 1:2], fused[:, 2:3]  # token stride 3 * 64, not 64
    run_and_check(batch, torch.float16, soft_cap=8.0)


def test_workspace_pool_outlives_plans_and_reuses_buffers():
    from blocks.attention.triton_paged import WorkspacePool

    pool = WorkspacePool()
    out, lse = pool.get(4, 3, 8, 64, torch.device("cpu"))
    assert out.shape == (4, 3, 8, 64) and lse.shape == (4, 3, 8) and out.dtype == lse.dtype == torch.float32
    again, _ = pool.get(4, 3, 8, 64, torch.device("cpu"))
    assert again.data_ptr() == out.data_ptr()  # same size class: same memory
    bigger, _ = pool.get(64, 3, 8, 64, torch.device("cpu"))
    assert bigger.data_ptr() != out.data_ptr() and len(pool._buffers) == 2
    be = TritonAttentionBackend(num_splits=3)
    batch = make_batch([(1, 50), (1, 9)], num_heads=4, num_kv_heads=2, head_dim=64, block_size=16,
                       dtype=torch.float32, device=DEVICE)
    run_and_check(batch, torch.float32, backend=be)
    workspace = next(iter(batch.metadata.plan.launches.values()))[0].workspace
    batch.metadata.plan = None  # dropping the plan keeps the backend's buffer alive
    assert any(workspace[0].data_ptr() == b.data_ptr() for b in be.workspace._buffers.values())

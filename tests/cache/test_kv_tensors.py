"""KV tensors: layout, per-layer views, byte-budget sizing."""

import random

import pytest
import torch

from blocks.cache.kv_tensors import (
    allocate_kv_cache,
    allocate_kv_cache_for_budget,
    bytes_per_block,
    bytes_per_token,
    layer_views,
    num_blocks_for_budget,
)


def test_views_alias_the_single_allocation():
    kv = allocate_kv_cache(3, 7, 5, 2, 6, dtype=torch.float32)
    assert kv.shape == (3, 2, 7, 5, 2, 6)
    views = layer_views(kv)
    assert len(views) == 3
    for layer, (k, v) in enumerate(views):
        assert k.shape == v.shape == (7, 5, 2, 6)
        val = torch.randn(5, 2, 6)
        k[4] = val
        assert torch.equal(kv[layer, 0, 4], val)
        assert k.data_ptr() == kv[layer, 0].data_ptr() and v.data_ptr() == kv[layer, 1].data_ptr()
    with pytest.raises(ValueError, match="kv_cache must be"):
        layer_views(kv[0])


@pytest.mark.parametrize("dtype,size", [(torch.float32, 4), (torch.bfloat16, 2), (torch.float8_e4m3fn, 1)])
def test_bytes_per_token_and_block_match_a_real_allocation(dtype, size):
    rng = random.Random(size)
    layers, bs, heads, dim = rng.randint(1, 5), rng.choice([1, 15, 16, 17]), rng.randint(1, 4), rng.choice([8, 24])
    per_token = bytes_per_token(num_layers=layers, num_kv_heads=heads, head_dim=dim, dtype=dtype)
    assert per_token == layers * 2 * heads * dim * size
    kv = allocate_kv_cache(layers, 3, bs, heads, dim, dtype=dtype)
    per_block = bytes_per_block(num_layers=layers, block_size=bs, num_kv_heads=heads, head_dim=dim, dtype=dtype)
    assert kv.numel() * kv.element_size() == 3 * per_block == 3 * bs * per_token


def test_llama3_8b_bf16_is_128_kib_per_token():
    assert bytes_per_token(num_layers=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16) == 128 * 1024


def test_budget_sizing_floors_to_whole_blocks():
    rng = random.Random(1)
    for _ in range(50):
        layers, bs, heads, dim = rng.randint(1, 4), rng.randint(1, 33), rng.randint(1, 4), rng.randint(1, 64)
        per_block = bytes_per_block(num_layers=layers, block_size=bs, num_kv_heads=heads, head_dim=dim,
                                    dtype=torch.float16)
        want = rng.randint(1, 40)
        budget = want * per_block + rng.randrange(per_block)
        assert num_blocks_for_budget(budget, num_layers=layers, block_size=bs, num_kv_heads=heads, head_dim=dim,
                                     dtype=torch.float16) == want
    kv = allocate_kv_cache_for_budget(10_000, 2, 3, 2, 4, dtype=torch.float32)
    assert kv.shape[2] == 10_000 // (2 * 2 * 3 * 2 * 4 * 4)
    assert kv.numel() * 4 <= 10_000


def test_budget_errors_name_the_field_and_the_limit():
    with pytest.raises(ValueError, match="budget_bytes=100 holds 0 blocks of 128 bytes; at least min_blocks=1"):
        num_blocks_for_budget(100, num_layers=1, block_size=4, num_kv_heads=1, head_dim=4, dtype=torch.float32)
    with pytest.raises(ValueError, match="budget_bytes must be an int >= 0"):
        num_blocks_for_budget(-1, num_layers=1, block_size=4, num_kv_heads=1, head_dim=4, dtype=torch.float32)
    with pytest.raises(ValueError, match="head_dim must be a positive int"):
        bytes_per_token(num_layers=1, num_kv_heads=1, head_dim=0, dtype=torch.float32)
    with pytest.raises(ValueError, match="num_blocks must be positive"):
        allocate_kv_cache(1, 0, 4, 1, 4)

"""Block copy: Triton kernel (interpreter on CPU, compiled on GPU) and torch waves vs the reference."""

import os
import random

import pytest
import torch

from blocks.cache.block_copy import block_copy, block_copy_reference, plan_copy_waves


def _random_pairs(rng, num_blocks, n, *, chained):
    pairs = []
    for _ in range(n):
        if chained and pairs and rng.random() < 0.4:
            src = pairs[-1][1]  # read what the previous pair wrote
        else:
            src = rng.randrange(num_blocks)
        pairs.append((src, rng.randrange(num_blocks)))
    return pairs


def test_waves_are_independent_and_preserve_order():
    rng = random.Random(0)
    for _ in range(200):
        pairs = _random_pairs(rng, 9, rng.randint(0, 12), chained=True)
        waves = plan_copy_waves(pairs)
        assert [p for w in waves for p in w] == [p for p in pairs if p[0] != p[1]]
        for w in waves:
            dsts = [d for _, d in w]
            assert len(set(dsts)) == len(dsts) and not set(dsts) & {s for s, _ in w}


interpreted = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter test; the GPU test covers CUDA")


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1, 7, 16, 2, 8), (3, 13, 5, 3, 24), (2, 6, 17, 3, 24)])  # L, N, bs, H, D
def test_triton_block_copy_matches_reference_under_interpreter(dtype, shape):
    assert os.environ["TRITON_INTERPRET"] == "1"
    layers, blocks, bs, heads, dim = shape
    kv = torch.randn(layers, 2, blocks, bs, heads, dim).to(dtype)
    rng = random.Random(blocks)
    pairs = _random_pairs(rng, blocks, 6, chained=True)
    want = kv.clone()
    block_copy_reference(want, pairs)
    block_copy(kv, pairs, backend="triton")
    assert torch.equal(kv, want)


@interpreted
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_triton_block_copy_bits_of_any_dtype_and_strided_cache(dtype):
    """bf16 / fp8 move as raw int16 / uint8 bits (fine in the interpreter); a sliced cache works."""
    big = torch.randn(2, 2, 11, 4, 3, 8).to(dtype)
    kv = big[1:]  # non-contiguous in the layer dim only
    pairs = [(1, 4), (4, 9), (2, 3)]
    want = kv.clone()
    block_copy_reference(want, pairs)
    untouched = big[0].clone()
    block_copy(kv, pairs, backend="triton")
    bits = torch.uint8 if dtype == torch.float8_e4m3fn else torch.int16
    assert torch.equal(kv.view(bits), want.view(bits)) and torch.equal(big[0].view(bits), untouched.view(bits))


def test_torch_backend_with_tensor_mapping_and_chained_list():
    kv = torch.randn(2, 2, 10, 4, 2, 6)
    want = kv.clone()
    block_copy_reference(want, [(3, 7), (5, 1)])
    block_copy(kv, torch.tensor([[3, 7], [5, 1]]), backend="torch")
    assert torch.equal(kv, want)
    pairs = [(1, 2), (2, 3), (3, 1)]  # a rotation: each reads the previous write
    block_copy_reference(want, pairs)
    block_copy(kv, pairs)
    assert torch.equal(kv, want)
    assert torch.equal(kv[:, :, 3], kv[:, :, 1])


def test_block_copy_validates_inputs():
    kv = torch.randn(1, 2, 4, 2, 1, 4)
    with pytest.raises(ValueError, match="outside \\[0, num_blocks=4\\)"):
        block_copy(kv, [(0, 4)])
    with pytest.raises(ValueError, match="kv_cache must be"):
        block_copy(kv[0], [(0, 1)])
    with pytest.raises(ValueError, match="int64 \\[num_pairs, 2\\]"):
        block_copy(kv, torch.tensor([[0, 1]], dtype=torch.int32))
    with pytest.raises(ValueError, match="backend must be"):
        block_copy(kv, [(0, 1)], backend="cuda")
    with pytest.raises(ValueError, match="contiguous"):
        block_copy(torch.randn(1, 2, 4, 3, 2, 4).transpose(3, 4), [(0, 1)], backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_block_copy_on_gpu_matches_reference(dtype):
    rng = random.Random(1)
    kv = torch.randn(4, 2, 257, 16, 8, 128, device="cuda").to(dtype)
    pairs = _random_pairs(rng, 257, 64, chained=True)
    want = kv.clone()
    block_copy_reference(want, pairs)
    block_copy(kv, pairs)
    torch.cuda.synchronize()
    assert torch.equal(kv, want)
    wave = torch.tensor(plan_copy_waves(pairs)[0], device="cuda")
    want2 = kv.clone()
    block_copy_reference(want2, wave.tolist())
    block_copy(kv, wave, backend="triton")
    assert torch.equal(kv, want2)


@pytest.mark.gpu
def test_triton_block_copy_offsets_past_int32_on_gpu():
    """A cache of > 2**31 elements (fp8, 2.3 GB): blocks near the end must copy without offset overflow."""
    num_blocks = 70_001
    kv = torch.randint(0, 255, (1, 2, num_blocks, 16, 8, 128), dtype=torch.uint8, device="cuda")
    kv = kv.view(torch.float8_e4m3fn)
    assert kv.numel() > 2**31
    pairs = [(num_blocks - 1, 3), (5, num_blocks - 2)]
    want_3, want_last2 = kv[:, :, num_blocks - 1].clone(), kv[:, :, 5].clone()
    block_copy(kv, pairs)
    bits = torch.uint8
    assert torch.equal(kv[:, :, 3].view(bits), want_3.view(bits))
    assert torch.equal(kv[:, :, num_blocks - 2].view(bits), want_last2.view(bits))

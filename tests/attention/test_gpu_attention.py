"""GPU-only attention tests: bf16, FP8 KV with bf16 queries, CUDA-graph capture, the CuPy kernels.

The ``tiled`` CuPy kernel (cupy_kernels_tiled.py) is tested here beside the scalar one.

Skipped without CUDA (``gpu`` marker); run on the device machine with
``python3 -m pytest -q tests/attention``. The fp32/fp16 tests of test_triton_attention.py run
there too, compiled instead of interpreted.
"""

from __future__ import annotations

import pytest
import torch

from blocks.attention import reference
from blocks.attention.triton_backend import TritonAttentionBackend
from tests.attention.helpers import DECODE_PAIRS, FP8, MIXED_PAIRS, assert_close_no_nan, make_batch
from tests.attention.test_triton_attention import run_and_check

pytestmark = pytest.mark.gpu

BF16 = torch.bfloat16
GPU_MATRIX = [  # (head_dim, block_size, (num_heads, num_kv_heads), window, soft_cap)
    (64, 16, (4, 4), None, None),
    (80, 32, (8, 2), 7, None),
    (96, 64, (7, 1), None, 5.0),
    (128, 16, (32, 8), None, None),
    (128, 64, (7, 1), 20, 5.0),
    (256, 32, (8, 2), None, None),
    (256, 16, (4, 4), 7, None),
]


@pytest.mark.parametrize("head_dim,block_size,heads,window,soft_cap", GPU_MATRIX)
@pytest.mark.parametrize("pairs", [MIXED_PAIRS, DECODE_PAIRS], ids=["mixed", "decode"])
def test_bf16_matches_reference(pairs, head_dim, block_size, heads, window, soft_cap):
    batch = make_batch(pairs, num_heads=heads[0], num_kv_heads=heads[1], head_dim=head_dim,
                       block_size=block_size, dtype=BF16, device="cuda")
    run_and_check(batch, BF16, sliding_window=window, soft_cap=soft_cap)


@pytest.mark.parametrize("num_splits", [None, 5])
@pytest.mark.parametrize("head_dim,block_size,heads", [(128, 16, (32, 8)), (80, 32, (7, 1)), (256, 64, (4, 4))])
@pytest.mark.parametrize("pairs", [MIXED_PAIRS, DECODE_PAIRS + [(1, 2000)]], ids=["mixed", "decode"])
def test_fp8_kv_matches_reference(pairs, head_dim, block_size, heads, num_splits):
    over = {} if num_splits is None else {"num_splits": num_splits}
    batch = make_batch(pairs, num_heads=heads[0], num_kv_heads=heads[1], head_dim=head_dim,
                       block_size=block_size, dtype=BF16, device="cuda", cache_dtype=FP8)
    run_and_check(batch, BF16, backend=TritonAttentionBackend(**over), sliding_window=None)


@pytest.mark.parametrize("backend_name", ["triton", "triton-walk", "cupy", "cupy-tiled"])
def test_cuda_graph_capture_and_replay(backend_name):
    """Plan once, capture write_kv + attend, then replay on new data with the same shapes (the second replay
    with a changed block table: the sorted walk is rebuilt inside the graph)."""
    if backend_name.startswith("cupy"):
        pytest.importorskip("cupy")
        from blocks.attention.cupy_backend import CupyAttentionBackend
        backend = CupyAttentionBackend(kernel="tiled" if backend_name == "cupy-tiled" else "scalar")
    else:
        backend = TritonAttentionBackend(sorted_walk=backend_name == "triton-walk")
    pairs = [(1, 300), (1, 17), (1, 1), (1, 2048)]
    batch = make_batch(pairs, num_heads=32, num_kv_heads=8, head_dim=128, block_size=16, dtype=BF16,
                       device="cuda", pad_rows=2, pad_tokens=2)
    md = backend.plan(batch.metadata)
    scale = 128**-0.5
    kc0, vc0 = batch.key_cache.clone(), batch.value_cache.clone()
    # warm up (compiles; allocates the split workspace) outside the capture
    backend.write_kv(batch.key, batch.value, batch.key_cache, batch.value_cache, md)
    backend.attend(batch.query, batch.key_cache, batch.value_cache, md, scale=scale)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        backend.write_kv(batch.key, batch.value, batch.key_cache, batch.value_cache, md)
        out = backend.attend(batch.query, batch.key_cache, batch.value_cache, md, scale=scale)
    torch.cuda.current_stream().wait_stream(stream)
    md.plan = None  # the engine drops the capture-time metadata: the split workspace must outlive it
    junk = [torch.full((1 << 20,), float("nan"), device="cuda") for _ in range(16)]  # reuse freed memory
    for replay in range(2):
        if replay == 1:  # row 0 now reads row 3's first 18 blocks (written keys) and its own last block
            md.block_table[0, :18] = md.block_table[3, :18]
        batch.key_cache.copy_(kc0)
        batch.value_cache.copy_(vc0)
        for t in (batch.query, batch.key, batch.value):
            t.normal_()
        graph.replay()
        torch.cuda.synchronize()
        ref_k, ref_v = kc0.clone(), vc0.clone()
        reference.reshape_and_cache(batch.key, batch.value, ref_k, ref_v, md.slot_mapping)
        want = reference.paged_attention(batch.query.float(), ref_k, ref_v, md, scale=scale)
        assert_close_no_nan(out, want, BF16)
    del junk


CUPY_CASES = [  # (dtype, cache_dtype, head_dim, (num_heads, num_kv_heads), window, soft_cap)
    (torch.float16, None, 64, (4, 4), None, None),
    (BF16, None, 128, (32, 8), None, None),
    (BF16, None, 80, (7, 1), 9, None),
    (torch.float32, None, 96, (8, 2), None, 5.0),
    (BF16, FP8, 128, (32, 8), None, None),
    (torch.float16, FP8, 256, (8, 2), 40, None),
]


@pytest.mark.parametrize("dtype,cache_dtype,head_dim,heads,window,soft_cap", CUPY_CASES)
@pytest.mark.parametrize("pairs", [DECODE_PAIRS, MIXED_PAIRS, [(1, 3000), (1, 700)]], ids=["decode", "mixed", "split"])
@pytest.mark.parametrize("kernel", ["scalar", "tiled"])
def test_cupy_kernel_matches_reference(kernel, pairs, dtype, cache_dtype, head_dim, heads, window, soft_cap):
    pytest.importorskip("cupy")
    from blocks.attention.cupy_backend import CupyAttentionBackend

    backend = CupyAttentionBackend(prefill_backend="cupy", kernel=kernel)  # the CUDA kernel for every row
    batch = make_batch(pairs, num_heads=heads[0], num_kv_heads=heads[1], head_dim=head_dim, block_size=16,
                       dtype=dtype, device="cuda", cache_dtype=cache_dtype, pad_rows=1, pad_tokens=1)
    loose = 2.0 if cache_dtype == FP8 else 1.0
    out = run_and_check(batch, dtype, backend=backend, loose=loose, sliding_window=window, soft_cap=soft_cap)
    assert (out[-1] == 0).all()


@pytest.mark.parametrize("block_size", [16, 64])
def test_cupy_tiled_kernel_reads_the_sorted_walk(block_size):
    """Few long decode rows read their blocks in physical order (the plan's walk table, as for Triton), split
    over several blocks of the grid: the result must not change, padding rows included."""
    pytest.importorskip("cupy")
    from blocks.attention.cupy_backend import CupyAttentionBackend

    backend = CupyAttentionBackend()
    batch = make_batch([(1, 9000), (1, 8193), (1, 12)], num_heads=32, num_kv_heads=8, head_dim=128,
                       block_size=block_size, dtype=BF16, device="cuda", pad_rows=1, pad_tokens=1)
    cfg = backend.plan(batch.metadata).plan.launches_for(batch.query, 8, split_mixed=False)[0].config
    assert cfg.sorted_walk and cfg.num_splits > 1
    out = run_and_check(batch, BF16, backend=backend)
    assert (out[-1] == 0).all()
    assert batch.metadata.plan.walk_table is not None  # the launch did read the walk, not the block table


def test_cupy_backend_routes_prefill_to_triton_and_rejects_cpu_tensors():
    pytest.importorskip("cupy")
    from blocks.attention.cupy_backend import CupyAttentionBackend, cupy_paged_decode_attention
    from blocks.attention.cupy_tiled_launch import cupy_tiled_decode_attention

    batch = make_batch(MIXED_PAIRS, num_heads=8, num_kv_heads=2, head_dim=128, block_size=32, dtype=BF16,
                       device="cuda")
    run_and_check(batch, BF16, backend=CupyAttentionBackend())
    cpu = make_batch([(1, 5)], num_heads=2, num_kv_heads=1, head_dim=64, block_size=16, dtype=torch.float32)
    for fn in (cupy_paged_decode_attention, cupy_tiled_decode_attention):
        with pytest.raises(ValueError, match="CUDA"):
            fn(cpu.query, cpu.key_cache, cpu.value_cache, cpu.metadata, scale=1.0)


def test_batches_of_every_size_reuse_one_compiled_kernel():
    """Step-varying integers (sequence and token counts, the part's first sequence) are not specialized:
    a serving engine whose batch sizes change every step must not compile a new variant mid-run."""
    from blocks.engine.step_profile import triton_variants

    def run(pairs):
        batch = make_batch(pairs, num_heads=32, num_kv_heads=8, head_dim=128, block_size=16, dtype=BF16,
                           device="cuda")
        run_and_check(batch, BF16)

    # block-table widths 5, 3, 1, 16, 19 (the row stride), 1 to 17 decode rows
    shapes = [[(1, 40), (1, 7), (16, 80)], [(1, 30)] * 16 + [(33, 33)], [(1, 9)] * 17 + [(12, 12), (1, 5)],
              [(1, 256), (16, 250)], [(1, 300)] * 3 + [(7, 19), (64, 64)]]
    run(shapes[0])
    before = triton_variants()
    for pairs in shapes[1:]:
        run(pairs)
    assert triton_variants().get("paged_attn_kernel") == before.get("paged_attn_kernel")

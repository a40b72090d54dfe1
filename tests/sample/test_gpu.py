"""GPU tests of the sampler (run on the lent H100 through the device tool; skipped without CUDA)."""

import pytest
import torch

from blocks.sample.ops import filter_threshold
from blocks.sample.params import SamplingParams
from blocks.sample.sampler import Sampler
from blocks.sample.triton_sample import triton_sample
from blocks.sample.triton_topk_topp import triton_thresholds
from tests.sample.test_distribution import _check, _draw
from tests.sample.test_seed import _run

pytestmark = pytest.mark.gpu


def test_triton_thresholds_match_reference_at_vocab_128k():
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows, vocab = 48, 128256
    x = torch.randn(rows, vocab, device="cuda", generator=gen) * torch.linspace(0.5, 6, rows, device="cuda")[:, None]
    temp = torch.linspace(0.3, 1.5, rows, device="cuda")
    temp[::7] = 0.0
    top_k = torch.tensor([[0, 1, 20, 50, 1000, 40000][i % 6] for i in range(rows)], device="cuda", dtype=torch.int32)
    top_p = torch.tensor([[1.0, 0.9, 0.5, 0.95][i % 4] for i in range(rows)], device="cuda")
    min_p = torch.tensor([[0.0, 0.0, 0.05][i % 3] for i in range(rows)], device="cuda")
    keys = torch.arange(rows, device="cuda", dtype=torch.int64)
    thr = triton_thresholds(x, temp, top_k, top_p, min_p)
    tokens = triton_sample(x, temp, top_k, top_p, min_p, keys)
    ref = filter_threshold(x, temp, top_k, top_p, min_p)
    kept, kept_ref = (x >= thr[:, None]).sum(1), (x >= ref[:, None]).sum(1)
    random_rows = temp > 0
    only_k = random_rows & (top_p >= 1) & (min_p == 0)
    assert torch.equal(kept[only_k], kept_ref[only_k])
    # top-p masses are summed in another order: allow one boundary token of rounding difference.
    assert int((kept[random_rows] - kept_ref[random_rows]).abs().max()) <= 1
    assert torch.equal(tokens[~random_rows], x[~random_rows].argmax(1))
    # the sampled token against the reference set, one boundary token of rounding allowed (as above)
    picked = x.gather(1, tokens[:, None]).squeeze(1)
    below = (x > picked[:, None]).sum(1) + 1  # the sampled token's rank
    assert bool((below[random_rows] <= kept_ref[random_rows] + 1).all())


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.8, top_k=30, top_p=0.9), SamplingParams(min_p=0.1)])
def test_triton_distribution_on_cuda(params):
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(257, generator=gen) * 1.5
    counts, expected = _draw("triton", params, logits, num_draws=200_000, rows_per_call=20_000, device="cuda")
    assert _check(counts, expected) > 1


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.7, top_p=0.9), SamplingParams(temperature=1.0)],
                         ids=["top_p", "no_filter"])
def test_triton_inverse_cdf_distribution_on_cuda(params):
    """Top-p rows without top-k and rows with no filter draw by inverse CDF: 200,000 draws over 600 tokens in lanes
    of 10 columns (tiles of 64) follow the filtered softmax."""
    gen = torch.Generator().manual_seed(12)
    logits = torch.randn(600, generator=gen) * 0.7
    counts, expected = _draw("triton", params, logits, num_draws=200_000, rows_per_call=20_000, device="cuda",
                             triton_options={"block": 64})
    assert _check(counts, expected) > 100


def test_seeded_request_reproducible_on_cuda():
    alone = _run("triton", others=0, sampler_seed=1, target_position=0)
    crowded = _run("triton", others=63, sampler_seed=5, target_position=20, drop_every=2)
    assert alone == crowded


def test_torch_and_triton_backends_agree_on_greedy_rows_on_cuda():
    from tests.sample.helpers import mixed_batch

    batch, _, gen = mixed_batch(40, 32000, seed=3, device="cuda", temperature=0.0)
    logits = (torch.randn(40, 32000, generator=gen) * 2).cuda()
    a = Sampler(backend="torch")(logits, batch).sampled_token_ids
    b = Sampler(backend="triton")(logits, batch).sampled_token_ids
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_sampler_step_makes_no_host_sync(backend):
    from tests.sample.helpers import mixed_batch

    batch, _, gen = mixed_batch(24, 32000, seed=8, device="cuda", repetition_penalty=1.2)
    logits = (torch.randn(24, 32000, generator=gen) * 2).cuda()
    sampler = Sampler(backend=backend, seed=0)
    sampler(logits, batch)  # the first call uploads the batch's parameters
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = sampler(logits, batch, inplace=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert out.sampled_token_ids.shape == (24,)


def test_sampling_kernel_compiles_once_for_every_batch_size():
    """The row count changes every step: it must not be specialized (a compile mid-run each time)."""
    from blocks.engine.step_profile import triton_variants

    def sample(rows):
        x = torch.randn(rows, 1000, device="cuda")
        p = dict(temperature=torch.full((rows,), 0.7, device="cuda"), top_k=torch.full((rows,), 5, device="cuda",
                 dtype=torch.int32), top_p=torch.full((rows,), 0.9, device="cuda"),
                 min_p=torch.zeros(rows, device="cuda"))
        ids = triton_sample(x, p["temperature"], p["top_k"], p["top_p"], p["min_p"],
                            torch.arange(rows, device="cuda", dtype=torch.int64))
        assert ids.shape == (rows,) and bool(((ids >= 0) & (ids < 1000)).all())

    sample(3)
    before = triton_variants()["_sample_kernel"]
    for rows in (1, 16, 17, 64, 250):
        sample(rows)
    assert triton_variants()["_sample_kernel"] == before


@pytest.mark.parametrize("stages", [2, 3, 4])
def test_pipelined_row_loops_give_the_same_tokens(stages):
    """Software pipelining (cp.async into shared memory) changes how the logits arrive, not the arithmetic."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    rows, vocab = 96, 128256
    x = torch.randn(rows, vocab, device="cuda", generator=gen) * 2.5
    temp = torch.tensor([[0.0, 0.8, 0.7, 1.0, 0.9, 0.6][i % 6] for i in range(rows)], device="cuda")
    top_k = torch.tensor([[0, 50, 0, 100, 0, 20][i % 6] for i in range(rows)], device="cuda", dtype=torch.int32)
    top_p = torch.tensor([[1.0, 1.0, 0.9, 0.95, 1.0, 0.8][i % 6] for i in range(rows)], device="cuda")
    min_p = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.05, 0.02][i % 6] for i in range(rows)], device="cuda")
    keys = torch.arange(rows, device="cuda", dtype=torch.int64) * 7919
    want = triton_sample(x, temp, top_k, top_p, min_p, keys, stages=1)  # no pipelining
    got = triton_sample(x, temp, top_k, top_p, min_p, keys, stages=stages)
    assert torch.equal(got, want)

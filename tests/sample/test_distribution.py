"""Empirical frequencies of many draws match the filtered, renormalised distribution."""

import math

import pytest
import torch

from blocks.sample.batch import SamplingBatch
from blocks.sample.params import SamplingParams
from blocks.sample.sampler import Sampler
from tests.sample.helpers import TRITON_DEVICE


def _draw(
    backend: str, params: SamplingParams, logits_row: torch.Tensor, num_draws: int, rows_per_call: int, device="cpu",
    triton_options: dict | None = None,
):
    vocab = logits_row.numel()
    logits_row = logits_row.to(device)
    batch = SamplingBatch(max_num_rows=rows_per_call, vocab_size=vocab, max_len=8, device=device)
    for r in range(rows_per_call):
        batch.add_request(f"r{r}", params, [r % vocab])
    sampler = Sampler(backend=backend, seed=1234, triton_options=triton_options)
    counts = torch.zeros(vocab, dtype=torch.float64)
    logits = logits_row[None].repeat(rows_per_call, 1)
    for _ in range(num_draws // rows_per_call):
        ids = sampler(logits, batch).sampled_token_ids
        counts += torch.bincount(ids, minlength=vocab).double().cpu()
    expected = torch.softmax(sampler.processed_logits(logits[:1], _one_row(params, vocab, device)), dim=-1)[0]
    return counts, expected.double().cpu()


def _one_row(params, vocab, device):
    one = SamplingBatch(max_num_rows=1, vocab_size=vocab, max_len=8, device=device)
    one.add_request("x", params, [0])
    return one


def chi2_quantile_9999(dof: int) -> float:
    """The 0.9999 quantile of a chi-square with ``dof`` degrees of freedom by Wilson-Hilferty: at most 7%
    above the exact value (dof 1), within 1.2% from dof 10. Avoids a scipy dependency."""
    z = 3.719  # standard normal 0.9999 quantile
    a = 2.0 / (9.0 * max(dof, 1))
    return max(dof, 1) * (1.0 - a + z * math.sqrt(a)) ** 3


def _check(counts, expected):
    n = counts.sum()
    kept = expected > 0
    assert counts[~kept].sum() == 0, "a filtered-out token was drawn"
    cos = torch.nn.functional.cosine_similarity(counts, expected, dim=0)
    assert cos > 0.99, f"cosine similarity {cos:.4f}"
    exp_counts = expected[kept] * n
    stat = float(((counts[kept] - exp_counts) ** 2 / exp_counts).sum())
    dof = int(kept.sum()) - 1
    assert stat < chi2_quantile_9999(dof), f"chi-square {stat:.1f} for {dof} dof"
    return int(kept.sum())


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.9, top_k=12),
        SamplingParams(temperature=1.3, top_p=0.8),
        SamplingParams(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05),
        SamplingParams(temperature=1.0),
    ],
    ids=["top_k", "top_p", "k_p_minp", "plain"],
)
def test_torch_sampler_frequencies_match_filtered_distribution(params):
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(61, generator=gen) * 1.5
    counts, expected = _draw("torch", params, logits, num_draws=20_000, rows_per_call=2_000)
    num_kept = _check(counts, expected)
    assert 1 < num_kept < 61 or params.top_k == 0 and params.top_p == 1.0


def test_chi_square_check_rejects_a_wrong_distribution():
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(61, generator=gen)
    counts, expected = _draw("torch", SamplingParams(temperature=1.0), logits, num_draws=10_000, rows_per_call=2_000)
    wrong = torch.softmax(logits.double() / 0.8, dim=0)  # a different temperature
    with pytest.raises(AssertionError):
        _check(counts, wrong)


def test_triton_sampler_frequencies_match_filtered_distribution():
    # The interpreter costs ~0.1 s per row, so few draws here; tests/sample/test_gpu.py draws 200k on CUDA.
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(9, generator=gen)
    params = SamplingParams(temperature=0.8, top_p=0.8)
    counts, expected = _draw("triton", params, logits, num_draws=200, rows_per_call=200, device=TRITON_DEVICE)
    num_kept = _check(counts, expected)
    assert 1 < num_kept < 9

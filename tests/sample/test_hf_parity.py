"""Parity with transformers' logits processors, row by row, in a mixed batch (both backends)."""

import pytest
import torch

from blocks.sample.sampler import Sampler
from tests.sample.helpers import TRITON_DEVICE, mixed_batch

transformers = pytest.importorskip("transformers")
from transformers.generation.logits_process import (  # noqa: E402
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


def _hf_processed(logits_row: torch.Tensor, history: list[int], p) -> torch.Tensor:
    procs = LogitsProcessorList()
    if p.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    if p.temperature > 0:
        procs.append(TemperatureLogitsWarper(p.temperature))
        if p.top_k > 0:
            procs.append(TopKLogitsWarper(p.top_k))
        if p.top_p < 1.0:
            procs.append(TopPLogitsWarper(p.top_p))
        if p.min_p > 0:
            procs.append(MinPLogitsWarper(p.min_p))
    return procs(torch.tensor([history]), logits_row[None].clone())[0]


@pytest.mark.parametrize("backend,num_rows,vocab", [("torch", 17, 997), ("torch", 3, 131), ("triton", 13, 301)])
def test_processed_logits_match_transformers_row_by_row(backend, num_rows, vocab):
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    batch, histories, gen = mixed_batch(num_rows, vocab, seed=num_rows * 31 + vocab, device=device)
    logits = torch.randn(num_rows, vocab, generator=gen) * 3.0
    ours = Sampler(backend=backend, seed=0).processed_logits(logits.to(device), batch).cpu()
    kinds = set()
    for r in range(num_rows):
        p = batch.params[r]
        ref = _hf_processed(logits[r], histories[r], p)
        kept, ref_kept = torch.isfinite(ours[r]), torch.isfinite(ref)
        assert torch.equal(kept, ref_kept), f"row {r} ({p}): kept sets differ"
        torch.testing.assert_close(ours[r][kept], ref[kept], rtol=1e-5, atol=1e-5)
        kinds.update(
            k for k, on in [("greedy", p.temperature == 0), ("top_k", 0 < p.top_k < vocab), ("top_p", p.top_p < 1),
                            ("min_p", p.min_p > 0), ("rep", p.repetition_penalty != 1)] if on
        )
    assert int(torch.isfinite(ours).sum()) < ours.numel(), "no row was filtered: the test proves nothing"
    if num_rows >= 13:
        assert kinds >= {"greedy", "top_k", "top_p", "min_p", "rep"}, kinds


def test_greedy_rows_are_exact_argmax_of_penalised_logits():
    batch, histories, gen = mixed_batch(9, 257, seed=5, temperature=0.0)
    logits = torch.randn(9, 257, generator=gen)
    out = Sampler(backend="torch", seed=1)(logits, batch)
    for r in range(9):
        ref = _hf_processed(logits[r], histories[r], batch.params[r])
        assert int(out.sampled_token_ids[r]) == int(ref.argmax())

"""The Triton threshold and sampling kernels against the torch reference (interpreter on CPU, fp32)."""

import pytest
import torch

from blocks.sample.ops import filter_threshold
from blocks.sample.triton_sample import triton_sample
from blocks.sample.triton_topk_topp import triton_thresholds
from tests.sample.helpers import TRITON_DEVICE as DEV


def _random_rows(num_rows, vocab, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_rows, vocab, generator=gen) * (0.5 + 3 * torch.rand(num_rows, 1, generator=gen))
    temp = torch.tensor([[0.0, 0.3, 0.8, 1.0, 1.9][i % 5] for i in range(num_rows)])
    top_k = torch.randint(0, vocab + 3, (num_rows,), generator=gen).to(torch.int32)
    top_k[::3] = 0
    some_p = torch.rand(num_rows, generator=gen) * 0.9 + 0.05
    top_p = torch.where(torch.rand(num_rows, generator=gen) < 0.6, some_p, 1.0)
    min_p = torch.where(torch.rand(num_rows, generator=gen) < 0.3, torch.rand(num_rows, generator=gen) * 0.3, 0.0)
    return x, temp, top_k, top_p, min_p


@pytest.mark.parametrize("num_rows,vocab,block", [(1, 1, 16), (3, 17, 16), (17, 97, 32), (9, 1000, 128)])
def test_kept_sets_match_reference(num_rows, vocab, block):
    x, temp, top_k, top_p, min_p = _random_rows(num_rows, vocab, seed=num_rows * vocab)
    if vocab > 20:
        x[1, : vocab // 3] = float("-inf")  # banned tokens
        x[2, 5:9] = x[2, 4]  # ties
    ref = filter_threshold(x, temp, top_k, top_p, min_p)
    args = tuple(t.to(DEV) for t in (x, temp, top_k, top_p, min_p))
    thr = triton_thresholds(*args, block=block, num_pivots=8).cpu()
    keys = torch.arange(num_rows, dtype=torch.int64, device=DEV) * 7919
    tokens = triton_sample(*args, keys, block=block, num_pivots=8).cpu()
    kept_ref, kept = x >= ref[:, None], x >= thr[:, None]
    random_rows = temp > 0
    assert torch.equal(kept[random_rows], kept_ref[random_rows])
    greedy = ~random_rows
    assert torch.equal(tokens[greedy], x[greedy].argmax(dim=1))
    assert bool(kept_ref.gather(1, tokens[:, None]).all()), "a sampled token is outside the kept set"
    if vocab > 20:
        assert int(kept[random_rows].sum()) < int(random_rows.sum()) * vocab, "nothing was filtered"


def test_persistent_programs_and_strided_rows_give_the_same_answer():
    x, temp, top_k, top_p, min_p = (t.to(DEV) for t in _random_rows(6, 200, seed=3))
    wide = torch.randn(6, 256, device=DEV)
    wide[:, :200] = x
    view = wide[:, :200]  # row stride 256, not contiguous
    keys = torch.arange(100, 106, dtype=torch.int64, device=DEV)
    for fn, kw in ((triton_thresholds, {}), (triton_sample, {"keys": keys})):
        a = fn(view, temp, top_k, top_p, min_p, block=64, num_programs=2, **kw)
        b = fn(x, temp, top_k, top_p, min_p, block=64, **kw)
        assert torch.equal(a, b), fn.__name__


def test_a_row_alone_gets_the_same_token_as_in_any_batch():
    """A row's token, top-p mass checks included, does not depend on the rows beside it (nor on how many
    there are, which sets the number of programs)."""
    x, temp, top_k, top_p, min_p = (t.to(DEV) for t in _random_rows(12, 700, seed=5))
    top_p[1::2] = 0.7  # many rejection rows
    top_k[1::2] = 0
    keys = torch.arange(12, dtype=torch.int64, device=DEV) * 104729
    whole = triton_sample(x, temp, top_k, top_p, min_p, keys, block=64)
    for lo, hi in ((3, 4), (0, 5), (5, 12)):
        part = triton_sample(x[lo:hi], temp[lo:hi], top_k[lo:hi], top_p[lo:hi], min_p[lo:hi], keys[lo:hi], block=64)
        assert torch.equal(part, whole[lo:hi]), (lo, hi)


def test_rejects_bad_inputs():
    x = torch.randn(2, 8, device=DEV)
    args = tuple(t.to(DEV) for t in (torch.ones(2), torch.zeros(2, dtype=torch.int32), torch.ones(2), torch.zeros(2)))
    keys = torch.zeros(2, dtype=torch.int64, device=DEV)
    for fn, extra in ((triton_thresholds, ()), (triton_sample, (keys,))):
        with pytest.raises(ValueError, match="float32"):
            fn(x.half(), *args, *extra)
        with pytest.raises(ValueError, match="unit stride"):
            fn(torch.randn(8, 2, device=DEV).t(), *args, *extra)


def test_candidate_compaction_changes_nothing_but_the_reads():
    # The noise is a function of (key, round, token id), so compacted (large scratch), partly compacted (a
    # scratch too small for some rows) and whole-row runs must pick the same tokens and keep the same sets.
    x, temp, top_k, top_p, min_p = (t.to(DEV) for t in _random_rows(10, 300, seed=11))
    keys = torch.arange(7, 17, dtype=torch.int64, device=DEV)
    args = (x, temp, top_k, top_p, min_p)
    thr = [triton_thresholds(*args, block=64, candidates=c) for c in (0, 16, 4096)]
    tokens = [triton_sample(*args, keys, block=64, candidates=c) for c in (1, 16, 4096)]
    for t in thr[1:]:
        assert torch.equal(x >= t[:, None], x >= thr[0][:, None])
    for t in tokens[1:]:
        assert torch.equal(t, tokens[0])


def test_second_pass_reads_only_chunks_that_can_hold_candidates():
    """Top-k and min-p rows gather their candidates from the chunks whose max passes the bound (pass 1's chunk
    maxima). Their race depends on the token ids only, so every tile width (another chunking) and the whole-row
    route (``candidates=1``) must pick the same tokens: a chunk skipped wrongly would drop a candidate."""
    gen = torch.Generator().manual_seed(23)
    rows, vocab = 12, 1000
    x = torch.randn(rows, vocab, generator=gen) * 2
    x[:, ::7] = float("-inf")  # banned tokens in every chunk
    x[3, 500:] = float("-inf")  # a row whose second half is banned
    x[4, 100:200] = x[4].max() + 1  # a run of ties at the top, in one chunk
    temp = torch.full((rows,), 0.9)
    top_k = torch.tensor([1, 5, 50, 200, 20, 7, 0, 0, 0, 3, 64, 10], dtype=torch.int32)
    top_p = torch.tensor([1.0] * 6 + [1.0, 1.0, 1.0, 0.5, 0.9, 1.0])
    min_p = torch.tensor([0.0] * 6 + [0.05, 0.2, 0.5, 0.0, 0.0, 0.1])
    args = tuple(t.to(DEV) for t in (x, temp, top_k, top_p, min_p))
    keys = torch.arange(rows, dtype=torch.int64, device=DEV) * 104729 + 5
    whole = triton_sample(*args, keys, block=64, candidates=1).cpu()
    for block in (16, 64, 256):
        assert torch.equal(triton_sample(*args, keys, block=block).cpu(), whole), block
    kept = x >= filter_threshold(x, temp, top_k, top_p, min_p)[:, None]
    assert bool(kept.gather(1, whole[:, None]).all())


def test_rejection_rounds_and_the_exact_fallback_draw_from_the_kept_set():
    """Top-p rows with a small ``top_p`` reject often; ``max_rounds=0`` and ``1`` force the exact fallback
    for every such row. Whatever the route, every token is in the reference's kept set, and a fixed key
    gives the same token on every call."""
    gen = torch.Generator().manual_seed(5)
    rows, vocab = 16, 200
    x = torch.randn(rows, vocab, generator=gen) * 1.5
    temp = torch.full((rows,), 1.0)
    top_k = torch.zeros(rows, dtype=torch.int32)
    top_p = torch.tensor([0.05, 0.2, 0.5, 0.9] * 4)
    min_p = torch.tensor([0.0] * 8 + [0.3] * 8)
    kept = x >= filter_threshold(x, temp, top_k, top_p, min_p)[:, None]
    args = tuple(t.to(DEV) for t in (x, temp, top_k, top_p, min_p))
    for max_rounds in (0, 1, 6):
        for step in range(3):
            keys = torch.arange(rows, dtype=torch.int64, device=DEV) + 1000 * step
            tokens = triton_sample(*args, keys, block=64, max_rounds=max_rounds).cpu()
            assert bool(kept.gather(1, tokens[:, None]).all()), (max_rounds, step)
            again = triton_sample(*args, keys, block=64, max_rounds=max_rounds).cpu()
            assert torch.equal(tokens, again)


@pytest.mark.parametrize("num_rows,vocab,max_len,block", [(1, 7, 3, 16), (5, 300, 40, 16), (3, 1000, 97, 32)])
def test_triton_penalties_equal_the_torch_reference(num_rows, vocab, max_len, block):
    from blocks.sample.ops import apply_penalties
    from blocks.sample.triton_penalties import triton_apply_penalties

    gen = torch.Generator().manual_seed(num_rows * max_len)
    x = torch.randn(num_rows, vocab, generator=gen) * 3
    ids = torch.randint(vocab, (num_rows, max_len), generator=gen)
    ids[:, -max_len // 3 :] = ids[:, :1]  # padding repeats the first token (and ids repeat anyway)
    counts = torch.zeros(num_rows, vocab, dtype=torch.int32)
    counts.scatter_add_(1, ids[:, max_len // 2 :], torch.ones_like(ids[:, max_len // 2 :], dtype=torch.int32))
    rep = 1.0 + torch.rand(num_rows, generator=gen)
    rep[0] = 1.0
    freq, pres = torch.rand(num_rows, generator=gen), torch.rand(num_rows, generator=gen)
    if num_rows > 1:
        freq[1], pres[1], rep[1] = 0.0, 0.0, 1.0  # a row without penalties is left alone
    kw = dict(repetition_penalty=rep, frequency_penalty=freq, presence_penalty=pres)
    want = apply_penalties(x.clone(), ids, counts, **kw)
    got = triton_apply_penalties(x.clone().to(DEV), ids.to(DEV), counts.to(DEV),
                                 **{k: v.to(DEV) for k, v in kw.items()}, block=block).cpu()
    # one rounding apart at most: the GPU fuses ``x - f * c - p * (c > 0)`` into FMAs
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert not torch.equal(got, x)


def test_sampling_kernel_applies_the_penalties_as_the_penalty_kernel_does():
    """``triton_sample(..., penalties=...)`` penalises each row in place before sampling it: the logits after
    the call and the tokens equal the separate penalty kernel followed by plain sampling, on every route
    (greedy, top-k, top-p, min-p rows, with and without penalties)."""
    from blocks.sample.triton_penalties import triton_apply_penalties

    num_rows, vocab, max_len = 9, 300, 37
    gen = torch.Generator().manual_seed(17)
    x, temp, top_k, top_p, min_p = _random_rows(num_rows, vocab, seed=23)
    ids = torch.randint(vocab, (num_rows, max_len), generator=gen)
    counts = torch.zeros(num_rows, vocab, dtype=torch.int32)
    counts.scatter_add_(1, ids[:, max_len // 2 :], torch.ones_like(ids[:, max_len // 2 :], dtype=torch.int32))
    rep = torch.where(torch.arange(num_rows) % 3 == 0, 1.0, 1.5)
    freq = torch.where(torch.arange(num_rows) % 3 == 1, 0.0, 2.0)
    pres = torch.full((num_rows,), 1.0)
    pres[::4] = 0.0
    freq[::4], rep[::4] = 0.0, 1.0  # rows 0, 4, 8 without penalties
    pen = tuple(t.to(DEV) for t in (ids, counts, rep, freq, pres))
    args = tuple(t.to(DEV) for t in (temp, top_k, top_p, min_p))
    keys = torch.arange(num_rows, dtype=torch.int64, device=DEV) * 7 + 3
    want_x = triton_apply_penalties(x.clone().to(DEV), *pen[:2], repetition_penalty=pen[2], frequency_penalty=pen[3],
                                    presence_penalty=pen[4])
    want = triton_sample(want_x.clone(), *args, keys, block=64)
    got_x = x.clone().to(DEV)
    got = triton_sample(got_x, *args, keys, block=64, penalties=pen)
    assert torch.equal(got_x, want_x) and not torch.equal(got_x.cpu(), x)
    assert torch.equal(got, want)


def test_top_k_above_the_finite_count_and_all_banned_rows_sample_in_range():
    """Rows whose top-k keeps every finite logit (the rest banned, e.g. ``allowed_token_ids``) draw among the
    finite ones on every route; a row with no finite logit still returns an id inside the vocabulary."""
    vocab = 100
    x = torch.full((6, vocab), float("-inf"))
    allowed = torch.tensor([3, 40, 77])
    x[:, allowed] = torch.tensor([0.5, 1.5, -0.2])
    x[5] = float("-inf")
    temp = torch.ones(6)
    top_k = torch.tensor([10, 10, 10, 3, 0, 10], dtype=torch.int32)
    top_p = torch.tensor([1.0, 0.9, 1.0, 1.0, 1.0, 1.0])
    min_p = torch.tensor([0.0, 0.0, 0.1, 0.0, 0.0, 0.0])
    args = tuple(t.to(DEV) for t in (x, temp, top_k, top_p, min_p))
    for step in range(4):
        keys = torch.arange(6, dtype=torch.int64, device=DEV) + 17 * step
        tokens = triton_sample(*args, keys, block=32).cpu()
        assert all(int(t) in allowed.tolist() for t in tokens[:5]), tokens
        assert 0 <= int(tokens[5]) < vocab


def test_workspace_is_reused_per_size_and_grows_when_needed():
    from blocks.sample.triton_search import per_stream, workspace

    cap, vals, ids, counters = workspace(4, 100, torch.device("cpu"))
    assert cap == 128 and vals.numel() >= 4 * 128 and counters.numel() >= 4
    again = workspace(2, 100, torch.device("cpu"))
    assert again[1] is vals and again[3] is counters  # a smaller call allocates nothing
    grown = workspace(counters.numel() + 3, 100, torch.device("cpu"))
    assert grown[1].numel() >= (counters.numel() + 3) * 128 and grown[3].numel() >= counters.numel() + 3
    # same sizes, another tag (another use, as the chunk maxima are): other buffers
    other = per_stream("test: another use", torch.device("cpu"), (4, 128), lambda n, slots: torch.empty(n * slots))
    assert other is not grown[1] and other.data_ptr() != grown[1].data_ptr()
    with pytest.raises(ValueError, match="candidates"):
        workspace(1, -1, torch.device("cpu"))

"""The Triton sampler's top-p rows: their inverse-CDF draws (``blocks.sample.triton_inverse_cdf``) and the
rejection tail (``blocks.sample.triton_reject``), where rows whose draws are all rejected finish in a second
kernel, their rows cut into chunks. Small chunks here, so every row spans several programs (interpreter on CPU,
fp32; compiled on CUDA)."""

import pytest
import torch
import triton
import triton.language as tl

from blocks.sample.ops import filter_threshold
from blocks.sample.triton_inverse_cdf import inverse_cdf_draws, softmax_pass
from blocks.sample.triton_reject import reject_workspace
from blocks.sample.triton_sample import triton_sample
from tests.sample.helpers import TRITON_DEVICE as DEV
from tests.sample.test_distribution import chi2_quantile_9999


def _same_row(num_rows, logits, temp, top_p, min_p):
    x = logits[None].repeat(num_rows, 1)
    full = lambda v: torch.full((num_rows,), v)  # noqa: E731
    return x, full(temp), torch.zeros(num_rows, dtype=torch.int32), full(top_p), full(min_p)


@pytest.mark.parametrize("temp,top_p,min_p", [(1.0, 0.5, 0.0), (0.8, 0.6, 0.1)], ids=["top_p", "top_p_min_p"])
def test_deferred_rounds_draw_the_kept_distribution(temp, top_p, min_p):
    """One row repeated with distinct keys (400 times in the interpreter, 20,000 on a GPU): the tokens follow
    the filtered softmax (chi-square) and none is filtered out (a deferred row the tail did not finish
    would keep its rejected candidate). In-place rounds (``defer_rejections=False``) agree on most rows: those
    one of the kernel's draws settles."""
    gen = torch.Generator().manual_seed(21)
    vocab, rows = 61, (20_000 if DEV == "cuda" else 400)
    logits = torch.randn(vocab, generator=gen) * 1.5
    args = tuple(t.to(DEV) for t in _same_row(rows, logits, temp, top_p, min_p))
    keys = torch.arange(rows, dtype=torch.int64, device=DEV) * 7919 + 11
    tokens = triton_sample(*args, keys, block=16, tail_chunk=16).cpu()  # lanes see 4 logits: their top-2 matters
    x = args[0][:1].cpu()
    thr = filter_threshold(x, *(a[:1].cpu() for a in args[1:]))
    expected = torch.softmax(torch.where(x >= thr[:, None], x / temp, float("-inf")), dim=-1)[0].double()
    counts = torch.bincount(tokens, minlength=vocab).double()
    kept = expected > 0
    assert counts[~kept].sum() == 0, "a filtered-out token was drawn"
    want = expected[kept] * rows
    stat = float(((counts[kept] - want) ** 2 / want).sum())
    assert stat < chi2_quantile_9999(int(kept.sum()) - 1), stat
    inline = triton_sample(*args, keys, block=16, defer_rejections=False).cpu()
    assert (tokens == inline).float().mean() > 0.6
    ws = reject_workspace(rows, vocab, torch.device(DEV), 16)
    assert int(ws["counters"].abs().sum()) == 0 and int(ws["arrive"].abs().sum()) == 0  # left reset


@pytest.mark.parametrize("max_rounds", [5, 6])
def test_few_rounds_fall_back_to_the_exact_search_inside_the_tail(max_rounds):
    """With 5 or 6 rounds (4 draws in the sampling kernel) a small ``top_p`` often exhausts them in the tail,
    which then runs the exact top-p search; every token stays in the kept set and a fixed key gives a fixed token."""
    gen = torch.Generator().manual_seed(5)
    rows, vocab = 24, 150
    x = torch.randn(rows, vocab, generator=gen) * 2
    temp = torch.full((rows,), 1.0)
    top_k = torch.zeros(rows, dtype=torch.int32)
    top_p = torch.tensor([0.05, 0.2, 0.5] * 8)
    min_p = torch.tensor([0.0] * 12 + [0.2] * 12)
    kept = x >= filter_threshold(x, temp, top_k, top_p, min_p)[:, None]
    args = tuple(t.to(DEV) for t in (x, temp, top_k, top_p, min_p))
    for step in range(3):
        keys = torch.arange(rows, dtype=torch.int64, device=DEV) + 1000 * step
        tokens = triton_sample(*args, keys, block=32, tail_chunk=32, max_rounds=max_rounds).cpu()
        assert bool(kept.gather(1, tokens[:, None]).all()), step
        assert torch.equal(tokens, triton_sample(*args, keys, block=32, tail_chunk=32, max_rounds=max_rounds).cpu())


def test_a_deferred_row_gets_the_same_token_alone_and_in_a_batch():
    gen = torch.Generator().manual_seed(9)
    rows, vocab = 10, 300
    x = (torch.randn(rows, vocab, generator=gen) * 2).to(DEV)
    temp = torch.full((rows,), 0.9, device=DEV)
    top_k = torch.zeros(rows, dtype=torch.int32, device=DEV)
    top_p = torch.full((rows,), 0.3, device=DEV)
    min_p = torch.zeros(rows, device=DEV)
    keys = torch.arange(rows, dtype=torch.int64, device=DEV) * 31337
    whole = triton_sample(x, temp, top_k, top_p, min_p, keys, block=32, tail_chunk=64)
    for lo, hi in ((0, 1), (4, 9)):
        part = triton_sample(x[lo:hi], temp[lo:hi], top_k[lo:hi], top_p[lo:hi], min_p[lo:hi], keys[lo:hi], block=32,
                             tail_chunk=64)
        assert torch.equal(part, whole[lo:hi]), (lo, hi)


def test_bad_tail_chunk_is_refused():
    x = torch.randn(2, 40, device=DEV)
    one = torch.ones(2, device=DEV)
    args = (x, one, torch.zeros(2, dtype=torch.int32, device=DEV), one * 0.5, one * 0)
    for chunk in (8, 48):
        with pytest.raises(ValueError, match="tail_chunk"):
            triton_sample(*args, torch.zeros(2, dtype=torch.int64, device=DEV), tail_chunk=chunk)


@triton.jit
def _draws_probe(x_ptr, u_ptr, out_ptr, vocab, c, BLOCK: tl.constexpr, NJ: tl.constexpr, K: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    m_vec, _, s_vec = softmax_pass(x_ptr, vocab, c, BLOCK, 16, False, 1)
    u = tl.load(u_ptr + tl.arange(0, K))
    toks, xs, _ = inverse_cdf_draws(x_ptr, vocab, m_vec, s_vec, tl.max(m_vec, axis=0), c, u, offs, BLOCK, NJ, False)
    tl.store(out_ptr + tl.arange(0, K), toks)
    tl.store(out_ptr + K + tl.arange(0, K), xs.to(tl.int32, bitcast=True))


def _lane_major(vocab, block):
    """Column order of the inverse-CDF draws: lane ``l`` owns ``l, l + block, ...``, lanes in turn."""
    return torch.tensor([c for lane in range(block) for c in range(lane, vocab, block)])


@pytest.mark.parametrize("block", [16, 64])
def test_inverse_cdf_draws_follow_the_lane_major_cumulative_mass(block):
    """Each draw is the column where the softmax's cumulative mass, in lane-major order, first passes ``u``
    (recomputed in float64 in torch), banned (-inf) columns and an all-banned lane are never drawn, the logit
    returned is the column's, and a row with no finite logit gives the sentinel ``vocab``."""
    gen = torch.Generator().manual_seed(block)
    checked = 0
    for trial in range(10):
        vocab = 37 + 29 * trial
        x = torch.randn(vocab, generator=gen) * 2
        x[torch.rand(vocab, generator=gen) < 0.2] = float("-inf")
        x[3::block] = float("-inf")  # lane 3 has no finite logit
        temp = 0.7
        u = torch.cat([torch.rand(6, generator=gen), torch.tensor([2.0**-24, 1 - 2.0**-24])])
        nj = triton.next_power_of_2(triton.cdiv(vocab, block))
        out = torch.zeros(16, dtype=torch.int32, device=DEV)
        _draws_probe[(1,)](x.to(DEV), u.to(DEV), out, vocab, 1.4426950408889634 / temp, BLOCK=block, NJ=nj, K=8)
        toks, xs = out[:8].cpu().long(), out[8:].cpu().view(torch.float32)
        order = _lane_major(vocab, block)
        cum = torch.cumsum(torch.softmax(x.double() / temp, dim=0)[order], dim=0)
        want = order[torch.searchsorted(cum, u.double(), right=True).clamp(max=vocab - 1)]
        near = (cum[None, :] - u.double()[:, None]).abs().min(dim=1).values < 1e-5
        assert torch.isfinite(x[toks]).all(), toks
        assert torch.equal(xs, x[toks])
        assert torch.equal(toks[~near], want[~near]), (trial, toks.tolist(), want.tolist())
        checked += int((~near).sum())
    assert checked >= 60
    banned = torch.full((50,), float("-inf"))
    out = torch.zeros(16, dtype=torch.int32, device=DEV)
    _draws_probe[(1,)](banned.to(DEV), u.to(DEV), out, 50, 1.0, BLOCK=block, NJ=triton.next_power_of_2(
        triton.cdiv(50, block)), K=8)
    assert out[:8].cpu().tolist() == [50] * 8

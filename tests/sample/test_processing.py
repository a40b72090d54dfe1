"""Logits processing of the sampler: penalties, min-tokens, logit bias, allowed / bad tokens, logprobs."""

import pytest
import torch

from blocks.sample.batch import SamplingBatch
from blocks.sample.logprobs import compute_logprobs, compute_prompt_logprobs
from blocks.sample.params import SamplingParams
from blocks.sample.sampler import Sampler

V = 53


def _batch(*reqs, eos=0):
    batch = SamplingBatch(max_num_rows=len(reqs) + 1, vocab_size=V, max_len=32)
    for i, (params, prompt, output) in enumerate(reqs):
        batch.add_request(f"r{i}", params, prompt, output_token_ids=output, eos_token_id=eos)
    return batch


def test_penalties_match_a_dense_reference():
    gen = torch.Generator().manual_seed(0)
    reqs = []
    for _ in range(5):
        params = SamplingParams(
            temperature=0.0,
            repetition_penalty=0.5 + float(torch.rand(1, generator=gen)),
            frequency_penalty=float(torch.rand(1, generator=gen)) * 4 - 2,
            presence_penalty=float(torch.rand(1, generator=gen)) * 4 - 2,
        )
        prompt = torch.randint(V, (7,), generator=gen).tolist()
        output = torch.randint(V, (9,), generator=gen).tolist()
        reqs.append((params, prompt, output))
    batch = _batch(*reqs)
    logits = torch.randn(5, V, generator=gen) * 3
    got = Sampler(backend="torch").processed_logits(logits, batch)
    for r, (p, prompt, output) in enumerate(reqs):
        ref = logits[r].clone()
        counts = torch.bincount(torch.tensor(output), minlength=V).float()
        seen = torch.zeros(V, dtype=torch.bool)
        seen[prompt + output] = True
        ref = torch.where(seen & (ref > 0), ref / p.repetition_penalty, ref)
        ref = torch.where(seen & (ref <= 0) & (logits[r] <= 0), ref * p.repetition_penalty, ref)
        ref = ref - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).float()
        torch.testing.assert_close(got[r], ref)


def test_append_tokens_updates_counts_used_by_penalties():
    batch = _batch((SamplingParams(temperature=0.0, frequency_penalty=1.5), [1, 2], []))
    logits = torch.zeros(1, V) + torch.linspace(0, 1, V)  # token V-1 is the argmax...
    sampler = Sampler(backend="torch")
    first = int(sampler(logits, batch).sampled_token_ids[0])
    assert first == V - 1
    batch.append_tokens(torch.tensor([first]))
    second = int(sampler(logits, batch).sampled_token_ids[0])
    assert second == V - 2  # ... until it was generated once and penalised


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[7])
    batch = _batch((params, [1], []), (SamplingParams(temperature=0.0), [1], []), eos=5)
    logits = torch.zeros(2, V)
    logits[:, 5], logits[:, 7], logits[:, 9] = 10.0, 9.0, 8.0
    sampler = Sampler(backend="torch")
    seen = []
    for _ in range(3):
        ids = sampler(logits, batch).sampled_token_ids
        seen.append(ids.tolist())
        batch.append_tokens(ids)
    assert [s[0] for s in seen] == [9, 9, 5] and [s[1] for s in seen] == [5, 5, 5]


def test_logit_bias_allowed_and_bad_words():
    bias = SamplingParams(temperature=0.0, logit_bias={11: 50.0, 12: -100})
    allowed = SamplingParams(temperature=0.0, allowed_token_ids=[3, 4])
    bad = SamplingParams(temperature=0.0)
    bad.bad_words_token_ids = [[20], [30, 31]]
    batch = _batch((bias, [1], []), (allowed, [1], []), (bad, [1], []))
    logits = torch.randn(3, V)
    logits[2, 20] = logits[2, 31] = 100.0
    logits[2, 32] = 90.0
    sampler = Sampler(backend="torch")
    proc = sampler.processed_logits(logits, batch)
    torch.testing.assert_close(proc[0, 11], logits[0, 11] + 50)
    assert torch.isfinite(proc[1]).sum() == 2 and torch.isfinite(proc[1, [3, 4]]).all()
    assert proc[2, 20] == float("-inf") and proc[2, 31] == 100.0  # [30, 31] only after 30
    ids = sampler(logits, batch).sampled_token_ids
    assert ids[0] == 11 and ids[1] in (3, 4) and ids[2] == 31
    batch.append_tokens(torch.tensor([11, 3, 30]))
    ids = sampler(logits, batch).sampled_token_ids
    assert ids[2] == 32, "the two-token bad word was not banned after its prefix"


def test_logprobs_and_ranks():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(4, V, generator=gen)
    chosen = torch.randint(V, (4,), generator=gen)
    lp = compute_logprobs(logits, chosen, 5)
    ref = torch.log_softmax(logits, dim=1)
    torch.testing.assert_close(lp.token_logprobs, ref.gather(1, chosen[:, None]).squeeze(1))
    ranks = (ref > ref.gather(1, chosen[:, None])).sum(1) + 1
    assert torch.equal(lp.token_ranks, ranks)
    torch.testing.assert_close(lp.topk_logprobs, ref.topk(5).values)
    top = ref[0].topk(2)
    assert lp.row(0, num_top=2) == {int(top.indices[i]): (float(top.values[i]), i + 1) for i in range(2)}


def test_sampler_returns_raw_or_processed_logprobs():
    batch = _batch((SamplingParams(temperature=0.7, top_k=3, logprobs=4, seed=1), [1], []),
                   (SamplingParams(temperature=0.0, logprobs=2), [2], []))
    logits = torch.randn(2, V)
    raw = Sampler(backend="torch", seed=0)(logits, batch)
    assert raw.logprobs.topk_ids.shape == (2, 4)
    torch.testing.assert_close(raw.logprobs.topk_logprobs, torch.log_softmax(logits, 1).topk(4).values)
    proc = Sampler(backend="torch", seed=0, logprobs_mode="processed_logprobs")(logits, batch)
    assert torch.isinf(proc.logprobs.topk_logprobs[0, 3]), "top-k=3 leaves a 4th processed logprob of -inf"
    torch.testing.assert_close(torch.logsumexp(proc.logprobs.topk_logprobs[0, :3], 0), torch.tensor(0.0))


def test_prompt_logprobs_match_log_softmax_in_chunks():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(11, V, generator=gen)
    prompt = torch.randint(V, (11,), generator=gen)
    lp = compute_prompt_logprobs(logits, prompt, num_logprobs=3, chunk_size=4)
    ref = torch.log_softmax(logits[:-1], 1).gather(1, prompt[1:, None]).squeeze(1)
    torch.testing.assert_close(lp.token_logprobs, ref)
    assert lp.topk_ids.shape == (10, 3)
    with pytest.raises(ValueError, match="prompt_token_ids"):
        compute_prompt_logprobs(logits, prompt[:5], num_logprobs=1)


def test_sampler_and_batch_validation():
    with pytest.raises(ValueError, match="backend"):
        Sampler(backend="cuda")
    with pytest.raises(ValueError, match="logprobs_mode"):
        Sampler(logprobs_mode="raw")
    batch = _batch((SamplingParams(), [1], []))
    with pytest.raises(ValueError, match="shape"):
        Sampler(backend="torch")(torch.randn(2, V), batch)
    with pytest.raises(ValueError, match="max_logprobs=20"):
        batch.add_request("big", SamplingParams(logprobs=21), [1])
    with pytest.raises(ValueError, match="already"):
        batch.add_request("r0", SamplingParams(), [1])
    with pytest.raises(ValueError, match=r"\[0, 53\)"):
        batch.add_request("oov", SamplingParams(), [V])
    with pytest.raises(ValueError, match="logit_bias token ids must be below vocab_size=53"):
        batch.add_request("lb", SamplingParams(logit_bias={V: 1.0}), [1])
    with pytest.raises(ValueError, match="allowed_token_ids"):
        batch.add_request("al", SamplingParams(allowed_token_ids=[1, V + 4]), [1])
    with pytest.raises(ValueError, match="max_num_rows"):
        SamplingBatch(max_num_rows=0, vocab_size=4, max_len=4)


def test_sort_plan_gives_the_full_sort_thresholds():
    from blocks.sample.ops import filter_threshold
    from tests.sample.helpers import mixed_batch

    batch, _, gen = mixed_batch(23, 501, seed=4)
    bt = batch.prepare()
    assert bt.sort_plan.top_k_rows is not None and bt.sort_plan.full_sort_rows is not None
    x = torch.randn(23, 501, generator=gen) * 2
    args = (x, bt.temperature, bt.top_k, bt.top_p, bt.min_p)
    planned, full = filter_threshold(*args, sort_plan=bt.sort_plan), filter_threshold(*args)
    assert torch.equal(x >= planned[:, None], x >= full[:, None])
    random_rows = bt.temperature > 0
    assert int((x >= planned[:, None])[random_rows].sum()) < 501 * int(random_rows.sum()), "nothing was filtered"


def test_empty_batch_samples_nothing():
    batch = SamplingBatch(max_num_rows=2, vocab_size=V, max_len=8)
    out = Sampler(backend="torch")(torch.randn(0, V), batch)
    assert out.sampled_token_ids.shape == (0,)
    batch.add_request("a", SamplingParams(temperature=0.5), [1])
    batch.remove_request("a")
    assert Sampler(backend="torch")(torch.randn(0, V), batch).sampled_token_ids.shape == (0,)


def test_exponential_race_is_argmax_of_probs_over_noise():
    from blocks.sample.ops import exponential_race

    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(7, V, generator=gen)
    logits[:, :10] = float("-inf")
    noise = torch.empty(7, V).exponential_(generator=gen)
    ids = exponential_race(logits, noise)
    assert torch.equal(ids, (torch.softmax(logits, 1) / noise).argmax(1)) and bool((ids >= 10).all())


def test_auto_backend_follows_the_logits_device():
    """``"auto"`` picks Triton for a CUDA device and torch for the CPU, whatever the machine has (a CPU engine on
    a machine with a GPU once sampled with Triton kernels on CPU tensors)."""
    assert Sampler(backend="auto", device="cpu").backend == "torch"
    assert Sampler(backend="auto", device="cuda").backend == "triton"
    assert Sampler(backend="auto").backend == ("triton" if torch.cuda.is_available() else "torch")


def test_triton_path_defers_rejection_rounds_only_when_rows_are_likely_to_need_them():
    """The tail kernel is launched (``defer_rejections``) only when more than 0.1 rows are expected to reject all 4
    draws: 256 rows at top-p 0.9 expect 0.026 (rounds in place), 8 rows at top-p 0.5 expect 0.5; top-k rows do not
    count; a change of membership is seen."""
    import numpy as np

    from blocks.sample.triton_sample import should_defer

    assert not should_defer(np.full(256, 0.9, dtype=np.float32))
    assert should_defer(np.full(8, 0.5, dtype=np.float32))
    assert not should_defer(np.zeros(0, dtype=np.float32))
    seen = []
    sampler = Sampler(backend="triton", seed=0)
    sampler._triton_sample = lambda x, *args, **kw: seen.append(kw["defer_rejections"]) or torch.zeros(
        x.shape[0], dtype=torch.int64)
    batch = SamplingBatch(max_num_rows=300, vocab_size=50, max_len=4)
    for r in range(256):
        batch.add_request(f"p{r}", SamplingParams(temperature=0.7, top_p=0.9), [1])
    for r in range(30):
        batch.add_request(f"k{r}", SamplingParams(temperature=0.7, top_k=5, top_p=0.2), [1])
    logits = torch.randn(batch.num_rows, 50)
    sampler(logits, batch)
    batch.add_request("low", SamplingParams(temperature=0.7, top_p=0.3), [1])
    sampler(torch.randn(batch.num_rows, 50), batch)
    batch.remove_request("low")
    sampler(logits, batch)
    assert seen == [False, True, False]

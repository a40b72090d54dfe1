"""Asynchronous scheduling gives the same outputs as the synchronous engine, request for request.

The asynchronous engine launches step ``k + 1`` before it reads step ``k``'s tokens (the scheduler counts them
as in flight, the runner takes them from the device); stops are seen a step late and their extra token is
dropped. Checked on a varied workload: seeded and greedy rows with every filter and penalty, ``min_tokens``,
stop strings and stop token ids, EOS, ``n > 1``, streaming, a KV cache small enough to preempt, chunked
prefill, and requests with logprobs that force synchronous steps in the middle of a run.
"""

from __future__ import annotations

import random

import pytest

from blocks import LLM, SamplingParams

_KINDS = [
    dict(temperature=0.0),
    dict(temperature=1.0, top_k=20),
    dict(temperature=0.8, top_p=0.9, repetition_penalty=1.2),
    dict(temperature=1.2, min_p=0.1, frequency_penalty=0.5, presence_penalty=0.3),
    dict(temperature=0.7, top_k=40, top_p=0.8, min_tokens=5),
]


def _workload(seed: int, n: int, *, eos: bool, logprobs: bool = False):
    rng = random.Random(seed)
    prompts, params = [], []
    for i in range(n):
        kw = dict(_KINDS[i % len(_KINDS)])
        kw.update(max_tokens=rng.randrange(5, 24), seed=1000 + i if i % 3 else None, ignore_eos=not eos)
        if i % 4 == 1:
            kw["stop_token_ids"] = rng.sample(range(1, 200), 12)
        if i % 7 == 4:
            kw["stop"] = ["e", "o"]
        if i % 5 == 2:
            kw["n"] = 2
        if logprobs and i % 6 == 3:
            kw["logprobs"] = 2
        if kw.get("seed") is None and kw["temperature"] > 0:
            kw["temperature"] = 0.0  # unseeded random rows differ between two engines: keep them greedy
        prompts.append({"prompt_token_ids": [rng.randrange(1, 200) for _ in range(rng.randrange(1, 40))]})
        params.append(SamplingParams(**kw))
    return prompts, params


def _tokens(outs):
    return [[(c.token_ids, c.finish_reason, c.stop_reason) for c in o.outputs] for o in outs]


@pytest.mark.parametrize("config", [
    dict(),
    dict(kv_cache_memory_bytes="blocks:10", max_model_len=96),
    dict(max_num_batched_tokens=16, long_prefill_token_threshold=8, max_num_seqs=5),
])
@pytest.mark.parametrize("logprobs", [False, True])
def test_async_equals_sync(tiny_llama, config, logprobs):
    path, _ = tiny_llama
    kwargs = dict(dtype="float32", device="cpu", max_model_len=128, enable_prefix_caching=True, seed=0)
    kwargs.update(config)
    budget = kwargs.get("kv_cache_memory_bytes")
    if isinstance(budget, str):
        probe = LLM(path, dtype="float32", device="cpu", max_model_len=96, max_num_seqs=1)
        kwargs["kv_cache_memory_bytes"] = int(budget.split(":")[1]) * probe.engine.runner.bytes_per_block
    prompts, params = _workload(7, 24, eos=True, logprobs=logprobs)
    runs = {}
    for mode in (False, True):
        llm = LLM(path, async_scheduling=mode, **kwargs)
        steps = []
        core = llm.engine
        orig = core.runner.launch

        def tracked(out, overlap=False, orig=orig, steps=steps):
            steps.append(overlap)  # launched to be read after the next one: overlapped
            return orig(out, overlap=overlap)

        core.runner.launch = tracked
        outs = llm.generate(prompts, params, use_tqdm=False)
        runs[mode] = _tokens(outs)
        assert not core.has_unfinished_requests()
        assert core.kv_manager.num_free_blocks == core.runner.num_blocks - 1  # every block back
        if mode and not logprobs:  # (with logprobs rows in every step, every step is synchronous)
            assert any(steps), "no step overlapped the next"
        if "kv_cache_memory_bytes" in config:
            assert core.scheduler.stats.num_preemptions > 0
    assert runs[True] == runs[False]


def test_async_streaming_and_abort(tiny_llama):
    """Streaming deltas add up to the final outputs, and an abort while a step is in flight frees
    everything and leaves the other requests unaffected."""
    path, _ = tiny_llama
    outs = {}
    for mode in (False, True):
        llm = LLM(path, dtype="float32", device="cpu", max_model_len=128, async_scheduling=mode, seed=0)
        core = llm.engine
        params = SamplingParams(temperature=0.0, max_tokens=15, ignore_eos=True)
        for i in range(4):
            core.add_request(f"s{i}", [3 + i, 9, 27, 81], params, stream=True)
        got: dict[str, list[int]] = {f"s{i}": [] for i in range(4)}
        steps = 0
        while core.has_unfinished_requests():
            for out in core.step():
                got[out.request_id] += list(out.outputs[0].token_ids)
            steps += 1
            if steps == 4:
                core.abort_request("s2")
        outs[mode] = got
        assert core.kv_manager.num_free_blocks == core.runner.num_blocks - 1
        assert all(len(got[r]) == 15 for r in ("s0", "s1", "s3"))
    assert {r: t for r, t in outs[True].items() if r != "s2"} == {r: t for r, t in outs[False].items() if r != "s2"}


@pytest.mark.gpu
@pytest.mark.parametrize("enforce_eager", [False, True])
def test_async_equals_sync_on_cuda(tiny_llama, enforce_eager):
    """On CUDA (the default there): decode graphs (their in-flight ids gathered inside the graph) or eager
    steps, the Triton sampler, a pinned host copy of the ids read a step later."""
    path, _ = tiny_llama
    prompts, params = _workload(11, 40, eos=True)
    runs = {}
    for mode in (False, True):
        llm = LLM(path, dtype="float32", device="cuda", max_model_len=128, max_num_seqs=16, seed=0,
                  enforce_eager=enforce_eager, async_scheduling=mode, gpu_memory_utilization=0.3)
        runs[mode] = _tokens(llm.generate(prompts, params, use_tqdm=False))
        core = llm.engine
        assert core.kv_manager.num_free_blocks == core.runner.num_blocks - 1
        assert (core.runner.counters["graph_steps"] > 0) != enforce_eager
    assert runs[True] == runs[False]


def test_async_request_id_reused_while_a_step_is_in_flight(tiny_llama):
    """An id aborted (or stopped, seen a step late) and added again at once: the new request gets its own
    tokens, not the in-flight token of the old one (the same as a fresh id, and as the synchronous engine)."""
    path, _ = tiny_llama
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    for mode in (False, True):
        core = LLM(path, dtype="float32", device="cpu", max_model_len=128, async_scheduling=mode, seed=0).engine
        got = {}

        def drain(core=core, got=got):
            while core.has_unfinished_requests():
                for o in core.step():
                    got[o.request_id] = list(o.outputs[0].token_ids)

        core.add_request("x", [3, 9, 27, 81], greedy)
        for _ in range(3):
            core.step()
        core.abort_request("x")
        core.add_request("x", [4, 8, 15, 16], greedy)
        drain()
        core.add_request("fresh", [4, 8, 15, 16], greedy)
        drain()
        assert got["x"] == got["fresh"], mode
        stop = SamplingParams(temperature=0.0, max_tokens=6, stop_token_ids=[got["fresh"][2]])
        core.add_request("y", [4, 8, 15, 16], stop)  # stops at its 3rd token; the next step is already queued
        while "y" not in got:
            for o in core.step():
                got[o.request_id] = list(o.outputs[0].token_ids)
        core.add_request("y", [4, 8, 15, 16], greedy)
        drain()
        assert got["y"] == got["fresh"], mode
        assert core.kv_manager.num_free_blocks == core.runner.num_blocks - 1


def test_async_with_bad_words_joining_mid_run(tiny_llama):
    """A request with multi-token bad words joins while other requests' steps overlap: the engine runs its
    steps synchronously (the bans need the last token on the host) and the outputs equal the sync engine's."""
    path, _ = tiny_llama
    runs = {}
    for mode in (False, True):
        core = LLM(path, dtype="float32", device="cpu", max_model_len=128, async_scheduling=mode, seed=0).engine
        core.add_request("a", [3, 9, 27, 81], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
        core.step()
        core.step()
        banned = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
        banned.bad_words_token_ids = [[5, 6], [250, 174]]
        core.add_request("b", [4, 8, 15, 16], banned)
        got = {}
        while core.has_unfinished_requests():
            for o in core.step():
                got[o.request_id] = list(o.outputs[0].token_ids)
        runs[mode] = got
    assert runs[True] == runs[False]

"""The engine process's delta encoding on the real EngineCore (in-process), synchronous and asynchronous:
streamed deltas concatenate to the finished text, stop strings included, and messages survive msgpack."""

from __future__ import annotations

import random

import pytest

from blocks.engine.engine_proc import encode_output, pack, sampling_params_to_dict, unpack
from blocks.engine.llm import LLM
from blocks.sample.params import SamplingParams


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def llm(tiny_model, request):
    return LLM(tiny_model, dtype="float32", device="cpu", max_model_len=128, kv_cache_memory_bytes=8 << 20,
               async_scheduling=request.param)


def _run(core, requests: dict[str, tuple[list[int], SamplingParams]], *, stream: bool) -> dict[str, dict]:
    for rid, (ids, params) in requests.items():
        core.add_request(rid, ids, params, stream=stream)
    got: dict[str, dict] = {rid: {} for rid in requests}
    while core.has_unfinished_requests():
        for out in core.step():
            delta = unpack(pack(encode_output(out)))  # through msgpack, as on the pipe
            rid, finished, comps = delta[0], delta[1], delta[2]
            for index, text, ids, _lps, _cum, finish, stop in comps:
                g = got[rid].setdefault(index, {"text": "", "ids": [], "finish": [], "stop": None})
                g["text"] += text
                g["ids"] += ids
                if finish is not None:
                    g["finish"].append(finish)
                    g["stop"] = stop
            if finished and not stream:  # a request that did not stream arrives whole, in one delta
                got[rid]["final"] = {c.index: c.text for c in out.outputs}
    return got


def test_stream_deltas_concatenate_to_the_final_text_with_stop_strings(llm):
    core = llm.engine
    rng = random.Random(4)
    prompts = [[rng.randrange(1, 200) for _ in range(rng.choice([1, 5, 16, 17, 31]))] for _ in range(5)]
    greedy = _run(core, {str(i): (p, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
                         for i, p in enumerate(prompts)}, stream=False)
    requests = {}
    for i, p in enumerate(prompts):
        text = greedy[str(i)][0]["text"]
        stops = []
        if len(text) > 8:
            start = rng.randrange(2, len(text) - 4)
            stops = [text[start:start + rng.randint(1, 4)], "never-there-" + str(i)]
        requests[str(i)] = (p, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=stops))
    streamed = _run(core, requests, stream=True)
    whole = _run(core, requests, stream=False)
    for rid in requests:
        s, w = streamed[rid][0], whole[rid][0]
        assert s["text"] == w["text"] == whole[rid]["final"][0]
        assert s["ids"] == w["ids"] and len(s["finish"]) == 1 and s["finish"] == w["finish"]
        if requests[rid][1].stop:
            assert s["finish"] == ["stop"] and s["stop"] == requests[rid][1].stop[0]
            assert greedy[rid][0]["text"].startswith(s["text"])
    assert not core.has_unfinished_requests() and core.kv_manager.usage == 0


def test_n_choices_report_finish_once_at_the_end(llm):
    core = llm.engine
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=9, ignore_eos=True)
    got = _run(core, {"r": ([5, 9, 13], params)}, stream=True)
    whole = _run(core, {"w": ([5, 9, 13], params)}, stream=False)["w"]  # seeded: the same samples
    for index in range(3):
        assert got["r"][index]["finish"] == ["length"] and len(got["r"][index]["ids"]) == 9
        assert got["r"][index]["text"] == whole[index]["text"] == whole["final"][index]
        assert got["r"][index]["ids"] == whole[index]["ids"]


def test_sampling_params_round_trip_through_msgpack():
    params = SamplingParams(n=2, temperature=0.7, top_k=-1, stop=["a", "bc"], stop_token_ids=[3],
                            logit_bias={5: 2.5}, seed=11, max_tokens=7, logprobs=2)
    again = SamplingParams(**unpack(pack([sampling_params_to_dict(params)]))[0])
    assert again == params


@pytest.mark.parametrize("field, value", [("allowed_token_ids", [1, 256]), ("logit_bias", {999: 1.0}),
                                          ("stop_token_ids", [4096])])
def test_engine_proc_refuses_out_of_vocabulary_ids_at_add(llm, field, value):
    """Such ids used to pass add_request and crash the engine's next step (found by the fuzz test)."""
    from blocks.engine.engine_proc import _Loop

    sent = []
    loop = _Loop(llm.engine, conn=None)
    loop.send = sent.append
    params = sampling_params_to_dict(SamplingParams(max_tokens=2, **{field: value}))
    loop.handle(["add", {"request_id": "bad", "prompt_token_ids": [1, 2], "params": params}])
    assert sent and sent[0][:3] == ["error", "bad", "value"] and field in sent[0][3]
    assert not llm.engine.has_unfinished_requests()


def test_take_merges_queued_deltas_and_keeps_an_error_for_later():
    from blocks.engine.async_llm import _take

    first = ["r", False, [[0, "a", [1], [[[1, -0.1, 1, "a"]]], -0.1, None, None],
                          [1, "x", [7], None, -0.5, None, None]], [1.0, 2.0, None, 0, 1.5], 0, None]
    second = ["r", False, [[0, "b", [2], [[[2, -0.2, 1, "b"]]], -0.3, None, None]], [1.0, 2.0, None, 0, 1.5], 0, None]
    last = ["r", True, [[0, "", [3], [[[3, -0.3, 1, ""]]], -0.6, "length", None],
                        [1, "y", [8], None, -0.9, "stop", "y"]], [1.0, 2.0, 3.0, 0, 1.5], 4, [None]]
    merged, rest = _take([first, second, last])
    assert rest == []
    assert merged[:2] == ["r", True] and merged[3:] == [[1.0, 2.0, 3.0, 0, 1.5], 4, [None]]
    by_index = {c[0]: c for c in merged[2]}
    assert by_index[0] == [0, "ab", [1, 2, 3], [[[1, -0.1, 1, "a"]], [[2, -0.2, 1, "b"]], [[3, -0.3, 1, ""]]],
                           -0.6, "length", None]
    assert by_index[1] == [1, "xy", [7, 8], None, -0.9, "stop", "y"]
    # an error behind a delta: the delta (merged with what came before the error) first, the error after it
    err = RuntimeError("engine died")
    b = ["r", False, [[0, "b", [3], None, None, None, None]], None, 0, None]
    c = ["r", False, [[0, "c", [4], None, None, None, None]], None, 0, None]
    merged, rest = _take([b, c, err])
    assert merged[2] == [[0, "bc", [3, 4], None, None, None, None]] and rest == [err]
    assert _take(rest) == (err, [])
    # one item alone is handed out as it is; nothing is merged past a finished delta
    assert _take([b]) == (b, [])
    done = ["r", True, [[0, "d", [5], None, None, "length", None]], None, 0, None]
    merged, rest = _take([b, done, c])
    assert merged[1] is True and merged[2][0][1] == "bd" and rest == [c]


def test_a_slow_stream_consumer_gets_fewer_items_with_the_same_output(tiny_model):
    """The engine does not wait for a slow reader: deltas that queued up arrive as one item, and their
    concatenation is still exactly the non-streamed output."""
    import asyncio

    from blocks.engine.async_llm import AsyncLLM
    from blocks.engine.config import EngineConfig

    engine = AsyncLLM(EngineConfig(model=tiny_model, dtype="float32", device="cpu", max_model_len=128,
                                   kv_cache_memory_bytes=8 << 20))
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=1)

    async def collect(rid: str, stream: bool, delay: float):
        items = []
        async for out in engine.generate(rid, [4, 8, 15, 16], params, stream=stream):
            items.append(out)
            await asyncio.sleep(delay)
        return items

    try:
        slow = asyncio.run(collect("slow", True, 0.05))
        whole = asyncio.run(collect("whole", False, 0))[0].outputs[0]
    finally:
        engine.shutdown()
    assert 2 <= len(slow) < 40 and slow[-1].finished
    assert "".join(o.outputs[0].text for o in slow) == whole.text
    assert [t for o in slow for t in o.outputs[0].token_ids] == whole.token_ids
    assert len([e for o in slow for e in o.outputs[0].logprobs]) == 40
    assert slow[-1].outputs[0].finish_reason == "length" and slow[-1].outputs[0].cumulative_logprob == \
        pytest.approx(whole.cumulative_logprob, abs=1e-4)

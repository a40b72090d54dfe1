"""The engine process's delta encoding on the real EngineCore (in-process): streamed deltas concatenate to
the finished text, stop strings included, and messages survive msgpack."""

from __future__ import annotations

import random

import pytest

from blocks.engine.engine_proc import encode_output, pack, sampling_params_to_dict, unpack
from blocks.engine.llm import LLM
from blocks.sample.params import SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(tiny_model, dtype="float32", device="cpu", max_model_len=128, kv_cache_memory_bytes=8 << 20)


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

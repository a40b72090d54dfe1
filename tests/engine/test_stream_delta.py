"""Streaming is O(new tokens) per step from the engine core to the pipe: a long stream's per-step output
and wire message do not grow with its length, and its deltas concatenate to the non-streamed output."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from blocks.engine.engine_proc import encode_output, pack, unpack
from blocks.engine.llm import LLM
from blocks.engine.outputs import RequestOutput
from blocks.engine.stream_delta import StreamDelta
from blocks.sample.params import SamplingParams

LONG = 200


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(tiny_llama[0], dtype="float32", device="cpu", max_model_len=256, kv_cache_memory_bytes=8 << 20)


def _same_logprobs(a: list, b: list) -> bool:
    """Equal entries up to float noise (a batch of other size may round the last bit differently)."""
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(x[t].rank == y[t].rank and x[t].decoded_token == y[t].decoded_token
                                     and x[t].logprob == pytest.approx(y[t].logprob, abs=1e-4) for t in x)
        for x, y in zip(a, b))


def _drain(core, rid: str) -> list:
    outs = []
    while core.has_unfinished_requests():
        outs += [o for o in core.step() if o.request_id == rid]
    return outs


def test_a_long_stream_ships_only_new_tokens_each_step(llm):
    core = llm.engine
    params = SamplingParams(temperature=0, max_tokens=LONG, ignore_eos=True, logprobs=2)
    core.add_request("long", [3, 1, 4, 1, 5], params, stream=True)
    core.add_request("short", [9, 2, 6], SamplingParams(temperature=0, max_tokens=7, ignore_eos=True), stream=True)
    deltas, sizes = [], []
    while core.has_unfinished_requests():
        outs = core.step()
        for out in outs:
            if out.request_id == "long":
                deltas.append(out)
        msg = pack(["outs", [encode_output(o) for o in outs if o.request_id == "long"], asdict(core.stats())])
        sizes.append(len(msg))
    assert all(isinstance(d, StreamDelta) for d in deltas)
    assert [d.finished for d in deltas] == [False] * (LONG - 1) + [True]
    # the core hands out each token id (and logprob entry) exactly once: never a copy of the output so far
    per_step = [len(d.outputs[0].token_ids) for d in deltas]
    assert per_step == [1] * LONG
    assert [len(d.outputs[0].logprobs) for d in deltas] == per_step
    # and the message on the pipe is as large at token 195 as at token 5 (a cumulative one grows by
    # >= 1 byte per token id, ~30 bytes per logprob entry and the text)
    early, late = sizes[3:8], sizes[LONG - 8:LONG - 3]
    assert max(late) <= max(early) + 16, (early, late)
    # reassembled, the stream is the whole greedy output
    full = llm.generate([[3, 1, 4, 1, 5]], params, use_tqdm=False)[0].outputs[0]
    wire = [unpack(pack(encode_output(d)))[2][0] for d in deltas]
    assert "".join(c[1] for c in wire) == "".join(d.outputs[0].text for d in deltas) == full.text
    assert [t for c in wire for t in c[2]] == full.token_ids
    assert _same_logprobs([e for d in deltas for e in d.outputs[0].logprobs], full.logprobs)
    assert deltas[-1].outputs[0].cumulative_logprob == pytest.approx(full.cumulative_logprob, abs=1e-3)
    assert deltas[-1].outputs[0].finish_reason == full.finish_reason == "length"
    assert all(d.outputs[0].finish_reason is None for d in deltas[:-1])
    assert core.kv_manager.usage == 0


@pytest.mark.parametrize("n", [1, 3])
def test_streamed_deltas_equal_the_non_streamed_output_at_temperature_0(llm, n):
    """Stop strings (held back until final) and several choices included."""
    core = llm.engine
    base = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    prompt = [7, 7, 1, 30, 2]
    text = llm.generate([prompt], base, use_tqdm=False)[0].outputs[0].text
    stop = [text[10:13]] if len(text) > 14 else []
    params = base.clone(n=n, stop=stop, logprobs=1) if n > 1 else base.clone(stop=stop, logprobs=1)
    whole = llm.generate([prompt], params, use_tqdm=False)[0]
    core.add_request(f"s{n}", prompt, params, stream=True)
    deltas = _drain(core, f"s{n}")
    assert deltas[-1].finished and not any(d.finished for d in deltas[:-1])
    for c in whole.outputs:
        mine = [next(x for x in d.outputs if x.index == c.index) for d in deltas]
        assert "".join(x.text for x in mine) == c.text
        assert [t for x in mine for t in x.token_ids] == c.token_ids
        assert _same_logprobs([e for x in mine for e in x.logprobs], c.logprobs)
        assert (mine[-1].finish_reason, mine[-1].stop_reason) == (c.finish_reason, c.stop_reason)
        if stop:
            assert c.finish_reason == "stop" and c.stop_reason == stop[0] and stop[0] not in c.text


def test_abort_of_a_stream_returns_only_the_rest(llm):
    core = llm.engine
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    core.add_request("ab", [5, 6, 7], params, stream=True)
    seen = []
    for _ in range(6):
        seen += [o for o in core.step() if o.request_id == "ab"]
    last = core.abort_request("ab")
    assert isinstance(last, StreamDelta) and last.finished and last.outputs[0].finish_reason == "abort"
    ids = [t for d in seen + [last] for t in d.outputs[0].token_ids]
    assert 1 <= len(ids) <= 6
    full = llm.generate([[5, 6, 7]], params.clone(max_tokens=len(ids)), use_tqdm=False)[0].outputs[0]
    assert ids == full.token_ids
    assert "".join(d.outputs[0].text for d in seen + [last]) == full.text
    assert not core.has_unfinished_requests() and core.kv_manager.usage == 0


def test_requests_that_do_not_stream_still_finish_whole(llm):
    core = llm.engine
    core.add_request("w", [1, 2, 3], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    outs = _drain(core, "w")
    assert len(outs) == 1 and isinstance(outs[0], RequestOutput) and outs[0].finished
    assert len(outs[0].outputs[0].token_ids) == 12 and outs[0].prompt_token_ids == [1, 2, 3]

"""A server without a tokenizer (``--skip-tokenizer-init``, implied for a named shape with dummy weights), as the
H100 serve benchmark runs it: token-id prompts stream chunks as tokens come (no text), and ``blocks bench serve``
sends the very workload of ``blocks bench throughput``."""

from __future__ import annotations

import argparse
import asyncio
import json

import httpx
import pytest

from blocks.engine.workload import random_workload
from serve.bench import run_benchmark, summarize
from serve.streams import ChoiceState
from tests.serve.conftest import Server


@pytest.fixture(scope="module")
def bare_server(tiny_model):
    srv = Server(tiny_model, "--skip-tokenizer-init", "--no-enable-prefix-caching")
    yield srv
    srv.stop()


def test_token_id_prompts_stream_a_chunk_per_step_without_text(bare_server):
    body = {"model": "tiny", "prompt": [5, 7, 11, 13], "max_tokens": 9, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    chunks = []
    with httpx.stream("POST", bare_server.base_url + "/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    # a chunk per step with new tokens (steps that queued up while the server was busy arrive as one): the first
    # token's chunk comes alone, so there are at least two although no chunk has text to show
    assert 2 <= len(choices) <= 9 and all(c["text"] == "" for c in choices)
    assert [c["finish_reason"] for c in choices] == [None] * (len(choices) - 1) + ["length"]
    assert chunks[-1]["usage"] == {"prompt_tokens": 4, "completion_tokens": 9, "total_tokens": 13}
    r = httpx.post(bare_server.base_url + "/chat/completions", timeout=30,
                   json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "tokenizer" in r.json()["error"]["message"]


def test_bench_serve_sends_the_throughput_workload(bare_server):
    prompts, outs = random_workload(6, (3, 20), (2, 9), 256, seed=5)
    results, wall = asyncio.run(run_benchmark(
        base_url=bare_server.base_url, model="tiny", num_prompts=6, input_len=1, output_len=1, max_concurrency=4,
        request_rate=float("inf"), workload=(prompts, outs)))
    summary = summarize(results, wall)
    assert summary["completed"] == 6 and summary["failed"] == 0
    assert [r.prompt_tokens for r in results] == [len(p) for p in prompts]
    assert [r.output_tokens for r in results] == outs
    assert summary["output_tokens"] == sum(outs) and summary["input_tokens"] == sum(map(len, prompts))
    # chunks reached the client as it went: several per request, except that steps which queued up while the
    # server was busy arrive as one chunk (a 2-token request may then come whole on a loaded machine)
    assert all(len(r.itl) <= n - 1 for r, n in zip(results, outs))
    assert sum(len(r.itl) >= 1 for r in results) >= len(results) // 2


def test_bench_serve_cli_workload_flags(bare_server, tmp_path):
    from blocks.cli import main

    out = tmp_path / "s.json"
    argv = ["bench", "serve", "--base-url", bare_server.base_url, "--model", "tiny", "--num-prompts", "5",
            "--input-len-range", "2", "12", "--output-len-range", "3", "6", "--vocab-size", "256", "--seed", "3",
            "--max-concurrency", "5", "--output-json", str(out)]
    assert main(argv) == 0
    got = json.loads(out.read_text())
    prompts, outs = random_workload(5, (2, 12), (3, 6), 256, seed=3)
    assert got["completed"] == 5 and got["wrong_output_lengths"] == 0
    assert got["output_tokens"] == sum(outs) and got["input_tokens"] == sum(map(len, prompts))
    with pytest.raises(SystemExit):  # the three go together
        main(["bench", "serve", "--base-url", bare_server.base_url, "--input-len-range", "2", "12"])


def test_random_workload_is_fixed_by_its_seed():
    a = random_workload(20, (1, 9), (4, 4), 50, seed=0)
    assert a == random_workload(20, (1, 9), (4, 4), 50, seed=0) != random_workload(20, (1, 9), (4, 4), 50, seed=1)
    assert all(1 <= len(p) <= 9 and all(0 <= t < 50 for t in p) for p in a[0]) and a[1] == [4] * 20
    with pytest.raises(ValueError, match="ranges"):
        random_workload(1, (5, 4), (1, 1), 10)


@pytest.mark.parametrize("argv, skip", [
    (["llama-3-8b", "--load-format", "dummy"], True),  # a named shape: there is no tokenizer to load
    (["llama-3-8b", "--load-format", "dummy", "--tokenizer", "/some/tok"], False),
    (["/path/to/model"], False),
    (["/path/to/model", "--skip-tokenizer-init"], True),
])
def test_serve_flags_skip_the_tokenizer_for_named_shapes(argv, skip):
    from serve.cli import add_parser, engine_kwargs

    p = argparse.ArgumentParser()
    add_parser(p)
    kwargs = engine_kwargs(p.parse_args(argv))
    assert kwargs["skip_tokenizer_init"] is skip


def test_choice_state_accumulates_deltas():
    class D:
        def __init__(self, text, ids, lps=None, fin=None, stop=None):
            self.text, self.token_ids, self.logprobs, self.finish_reason, self.stop_reason = text, ids, lps, fin, stop

    st = ChoiceState()
    assert st.text == "" and st.logprobs is None
    for k in range(300):
        st.add(D(f"t{k} ", [k], [{k: k}]))
        assert st.num_chars == len(st.text)
    st.add(D("", [], None, "stop", "x"))
    assert st.text == "".join(f"t{k} " for k in range(300)) and st.token_ids == list(range(300))
    assert st.logprobs == [{k: k} for k in range(300)] and (st.finish_reason, st.stop_reason) == ("stop", "x")

"""The embedded default model behind a real ``blocks serve`` on 127.0.0.1: the README's curl examples run as
written, and a bounded load test (500 concurrent streaming requests) completes correctly and leaves nothing
behind. Prints the load test's latency percentiles (``pytest -s``)."""

import asyncio
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from blocks import LLM, SamplingParams
from blocks.default_model_path import default_model_path
from serve.bench import run_benchmark, summarize
from tests.serve.conftest import Server

ROOT = Path(__file__).resolve().parents[2]
QUESTIONS = ["What is the capital of France?", "What is 7 plus 5?", "How many grams are in 3 kilograms?",
             "Write a JSON record for Ana, age 31.", "What is the capital of Japan?"]
OUTPUT_LEN = 12


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    srv = Server(default_model_path(), "--max-model-len", "256", "--kv-cache-memory-bytes", str(64 << 20),
                 "--served-model-name", "default", log_dir=str(tmp_path_factory.mktemp("default_server")))
    yield srv
    srv.stop()


def _readme_curls(port: int) -> list[str]:
    """The README's curl commands (backslash continuations joined), pointed at the test server's port."""
    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    cmds = [line.strip() for line in text.splitlines() if line.strip().startswith("curl ")]
    return [re.sub(r"localhost:8000", f"127.0.0.1:{port}", c) for c in cmds]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_readme_curl_examples_run_as_written(default_server):
    cmds = _readme_curls(default_server.port)
    assert len(cmds) >= 3, cmds  # completions, streaming chat, metrics
    outputs = []
    for cmd in cmds:
        done = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (cmd, done.stderr)
        outputs.append(done.stdout)
    joined = "\n".join(outputs)
    assert '"object":"text_completion"' in joined.replace(" ", "")
    assert "data: [DONE]" in joined and '"role":"assistant"' in joined.replace(" ", "")
    assert "blocks:num_requests_running" in joined


def test_500_concurrent_streams_complete_correctly_and_leave_nothing_behind(default_server):
    llm = LLM(device="cpu", max_model_len=256)
    tok = llm.get_tokenizer()
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                  tokenize=False), add_special_tokens=False) for q in QUESTIONS]
    params = SamplingParams(temperature=0.0, max_tokens=OUTPUT_LEN, ignore_eos=True)
    want = [o.outputs[0].text for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                     use_tqdm=False)]
    n = 500
    workload = ([prompts[i % len(prompts)] for i in range(n)], [OUTPUT_LEN] * n)
    results, wall = asyncio.run(run_benchmark(
        base_url=default_server.base_url, model="default", num_prompts=n, input_len=0, output_len=OUTPUT_LEN,
        max_concurrency=n, request_rate=float("inf"), workload=workload))
    summary = summarize(results, wall)
    print(f"\n500 concurrent streams: {wall:.1f} s, {summary['output_tokens_per_s']:.0f} output tok/s, "
          f"TTFT p50/p99 {summary['p50_ttft_ms']:.0f}/{summary['p99_ttft_ms']:.0f} ms, "
          f"E2E p50/p99 {summary['p50_e2e_ms']:.0f}/{summary['p99_e2e_ms']:.0f} ms")
    assert summary["completed"] == n, summary.get("first_error")
    wrong = [i for i, r in enumerate(results) if r.text != want[i % len(prompts)] or r.output_tokens != OUTPUT_LEN]
    assert not wrong, (wrong[:5], results[wrong[0]].text, want[wrong[0] % len(prompts)])
    deadline = time.time() + 5
    while True:  # all finished: nothing running, waiting or holding KV blocks
        m = default_server.metrics()
        idle = (m.get("blocks:num_requests_running", 1) == 0 and m.get("blocks:num_requests_waiting", 1) == 0
                and m.get("blocks:kv_cache_usage_perc", 1) == 0)
        if idle or time.time() > deadline:
            break
        time.sleep(0.1)
    assert idle, {k: v for k, v in m.items() if "running" in k or "waiting" in k or "usage" in k}

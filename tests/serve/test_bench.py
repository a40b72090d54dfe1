"""``python -m serve.bench`` against the shared server: every request completes with the asked length."""

from __future__ import annotations

import asyncio
import math

from serve.bench import run_benchmark, summarize


def test_load_generator_reports_consistent_numbers(server):
    results, wall = asyncio.run(run_benchmark(
        base_url=server.base_url, model="tiny", num_prompts=7, input_len=9, output_len=5, max_concurrency=3,
        request_rate=50.0, seed=2, api_key=server.api_key))
    summary = summarize(results, wall)
    assert summary["completed"] == 7 and summary["failed"] == 0
    assert all(r.output_tokens == 5 and r.prompt_tokens == 9 for r in results)
    assert math.isclose(summary["output_tokens_per_s"], 35 / wall)
    assert 0 < summary["p50_ttft_ms"] <= summary["p99_ttft_ms"] <= summary["p99_e2e_ms"]
    bad = asyncio.run(run_benchmark(base_url=server.base_url, model="tiny", num_prompts=2, input_len=3,
                                    output_len=2, max_concurrency=2, request_rate=float("inf"), api_key="wrong"))
    assert summarize(*bad)["failed"] == 2


def test_blocks_bench_serve_cli_passes_through(server, tmp_path):
    import json

    from blocks.cli import main

    out = tmp_path / "serve.json"
    rc = main(["bench", "serve", "--base-url", server.base_url, "--model", "tiny", "--num-prompts", "3",
               "--input-len", "4", "--output-len", "3", "--max-concurrency", "2", "--api-key", server.api_key,
               "--output-json", str(out)])
    assert rc == 0
    assert json.loads(out.read_text())["completed"] == 3

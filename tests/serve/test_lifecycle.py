"""Disconnects free their KV blocks; a full queue answers 503; a dead engine turns /health 503; SIGTERM is clean."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time

import httpx
import pytest

from tests.serve.conftest import Server, alive, engine_pids


def _wait_idle(server, timeout: float = 5.0) -> dict:
    deadline = time.time() + timeout
    while True:
        m = server.metrics()
        idle = (m["blocks:num_requests_running"], m["blocks:num_requests_waiting"], m["blocks:kv_cache_usage_perc"])
        if idle == (0, 0, 0) or time.time() > deadline:
            return m
        time.sleep(0.05)


def test_abandoned_streams_are_aborted_and_free_their_blocks(server):
    """Many streaming requests with long max_tokens, dropped after their first chunk."""
    num = 100
    rng = random.Random(9)

    async def abandon(client: httpx.AsyncClient, i: int) -> int:
        body = {"prompt": [rng.randrange(1, 200) for _ in range(rng.randint(3, 30))], "max_tokens": 90,
                "stream": True, "ignore_eos": True, "temperature": 0.7, "seed": i}
        async with client.stream("POST", server.url + "/v1/completions", json=body, headers=server.headers) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    return 1  # leaving the block closes the connection mid-stream
        return 0

    async def run() -> list[int]:
        limits = httpx.Limits(max_connections=num)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            return await asyncio.gather(*(abandon(client, i) for i in range(num)))

    before = server.metrics()["blocks:generation_tokens_total"]
    assert sum(asyncio.run(run())) == num
    generated = server.metrics()["blocks:generation_tokens_total"] - before
    assert generated < num * 90 / 2, f"the requests ran on instead of aborting ({generated} tokens)"
    t0 = time.time()
    m = _wait_idle(server)
    waited = time.time() - t0
    assert m["blocks:num_requests_running"] == 0 and m["blocks:num_requests_waiting"] == 0
    assert m["blocks:kv_cache_usage_perc"] == 0, f"KV blocks leaked: {m['blocks:kv_cache_usage_perc']}"
    assert waited < 2.0, f"took {waited:.2f} s to go idle"
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "The quick", "max_tokens": 4},
                   headers=server.headers, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_non_streaming_client_timeout_aborts_the_request(server):
    # 16 x 120 tokens take seconds even on an idle machine; the client gives up after 0.15 s
    body = {"prompt": "The quick brown", "max_tokens": 120, "ignore_eos": True, "n": 16, "temperature": 1.0}
    start = server.metrics().get("blocks:generation_tokens_total", 0.0)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, headers=server.headers, timeout=0.15)
    m = _wait_idle(server)
    assert m["blocks:kv_cache_usage_perc"] == 0 and m["blocks:num_requests_running"] == 0
    assert m.get("blocks:generation_tokens_total", 0.0) - start < 16 * 120  # aborted, not run to the end


@pytest.fixture(scope="module")
def small_server(tiny_model):
    """One sequence at a time and a waiting queue of one: easy to fill."""
    srv = Server(tiny_model, "--max-num-seqs", "1", "--max-num-queued-requests", "1", "--shutdown-timeout", "3")
    yield srv
    srv.stop()


def test_full_queue_answers_503_with_retry_after_then_recovers(small_server):
    srv = small_server
    body = {"prompt": "The quick", "max_tokens": 60, "ignore_eos": True}

    async def run():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(client.post(srv.url + "/v1/completions", json=body) for _ in range(6)))

    responses = asyncio.run(run())
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes and 503 in codes, codes
    for r in responses:
        if r.status_code == 503:
            err = r.json()["error"]
            assert err["code"] == 503 and "max_num_queued_requests" in err["message"]
            assert int(r.headers["retry-after"]) >= 1
        else:
            assert r.json()["usage"]["completion_tokens"] == 60
    m = _wait_idle(srv)
    assert m["blocks:kv_cache_usage_perc"] == 0
    ok = httpx.post(srv.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200


def test_sigterm_with_a_request_in_flight_exits_cleanly(tiny_model):
    srv = Server(tiny_model, "--shutdown-timeout", "1")
    engine = engine_pids(srv.proc.pid)[0]
    with httpx.Client(timeout=30) as client, client.stream(
        "POST", srv.url + "/v1/completions",
        json={"prompt": "The", "max_tokens": 120, "ignore_eos": True, "stream": True},
    ) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: {"))
        srv.proc.send_signal(signal.SIGTERM)
        code = srv.proc.wait(20)
    assert code in (0, -signal.SIGTERM)
    deadline = time.time() + 5
    while alive(engine) and time.time() < deadline:
        time.sleep(0.05)
    assert not alive(engine), "orphan engine process"
    assert "engine stopped" in srv.logs()
    srv.stop()


def test_dead_engine_turns_health_503(small_server):
    srv = small_server
    assert httpx.get(srv.url + "/health").status_code == 200
    engine = engine_pids(srv.proc.pid)[0]
    os.kill(engine, signal.SIGKILL)
    deadline = time.time() + 5
    while httpx.get(srv.url + "/health").status_code != 503 and time.time() < deadline:
        time.sleep(0.05)
    r = httpx.get(srv.url + "/health")
    assert r.status_code == 503 and r.json()["error"]["code"] == 503
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=10)
    assert r.status_code == 503, r.text
    assert srv.proc.poll() is None, "the API process should stay up to report the failure"

"""``blocks serve --tensor-parallel-size 2`` on the CPU (gloo): answers like TP=1 and leaves no process."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from tests.serve.conftest import Server, alive, children


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        out += kids
        todo += kids
    return out


def test_tp2_server_answers_like_tp1(tiny_model, server):
    body = {"model": "tiny", "prompt": [5, 9, 2, 7], "max_tokens": 6, "temperature": 0}
    want = httpx.post(server.base_url + "/completions", json=body, headers=server.headers, timeout=60).json()
    tp2 = Server(tiny_model, "--tensor-parallel-size", "2")
    try:
        procs = _descendants(tp2.proc.pid)
        workers = [p for p in procs if b"blocks.engine.tp_workers" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(workers) == 1
        got = httpx.post(tp2.base_url + "/completions", json=body, timeout=60).json()
        assert got["choices"][0]["text"] == want["choices"][0]["text"]
    finally:
        tp2.stop()
    deadline = time.time() + 15
    while any(alive(p) for p in procs) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(alive(p) for p in procs), "a server, engine or TP worker process outlived the server"

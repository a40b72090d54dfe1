"""The app in-process over a stub engine (no model): --strict-fields, the lifespan hook, a dead engine."""

from __future__ import annotations

from fastapi.testclient import TestClient

from serve.app import build_app
from serve.state import ServerState


class _Tok:
    def encode(self, text, add_special_tokens=True):
        return [ord(c) % 50 + 1 for c in text]


class _StubEngine:
    """Answers every request with an error, so only the server-side checks are exercised."""

    tokenizer = _Tok()
    max_model_len = 64
    vocab_size = 100
    model_path = "/nowhere"
    stats = {"num_running": 2, "num_waiting": 1, "kv_usage": 0.25}

    def __init__(self, alive: bool = True) -> None:
        self.alive = alive
        self.calls = 0

    def is_alive(self) -> bool:
        return self.alive

    dead_reason = "stub"

    async def generate(self, *args, **kwargs):
        self.calls += 1
        raise ValueError("stub engine: prompt rejected")
        yield  # pragma: no cover


def test_strict_fields_rejects_unknown_fields_before_the_engine():
    engine = _StubEngine()
    stopped = []
    app = build_app(ServerState(engine, ["m"], strict_fields=True), on_shutdown=lambda: stopped.append(1))
    with TestClient(app) as client:
        r = client.post("/v1/completions", json={"prompt": "hi", "guided_regex": "a+", "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "guided_regex"
        assert engine.calls == 0
        r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 400 and "stub engine" in r.json()["error"]["message"]
        assert engine.calls == 1
        text = client.get("/metrics").text
        assert 'blocks:num_requests_running{model_name="m"} 2.0' in text
        assert 'blocks:kv_cache_usage_perc{model_name="m"} 0.25' in text
    assert stopped == [1]


def test_dead_engine_health_and_models():
    app = build_app(ServerState(_StubEngine(alive=False), ["a", "b"]))
    with TestClient(app) as client:
        r = client.get("/health")
        assert r.status_code == 503 and "stub" in r.json()["error"]["message"]
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["a", "b"]
        assert client.post("/v1/completions", json={"model": "b", "prompt": "x", "max_tokens": 100}).json()[
            "error"]["param"] == "max_tokens"

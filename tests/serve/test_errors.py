"""Malformed and out-of-limit requests over raw httpx: OpenAI's error shape, the right status, the field named."""

from __future__ import annotations

import random

import httpx
import pytest


def _post(server, path: str, body=None, *, content: bytes | None = None, headers: dict | None = None):
    h = {**server.headers, **(headers or {})}
    if content is not None:
        return httpx.post(server.url + path, content=content, headers={**h, "content-type": "application/json"})
    return httpx.post(server.url + path, json=body, headers=h, timeout=30)


def _error(r, status: int, param: str | None = "any") -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status and err["message"]
    if param != "any":
        assert err["param"] == param, err
    return err


@pytest.mark.parametrize("raw", [b'{"prompt": "x",', b"not json", b"[1, 2", b'{"prompt": "\xff"}'])
def test_malformed_json_is_400(server, raw):
    _error(_post(server, "/v1/completions", content=raw), 400)


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "max_tokens": "many"}, "max_tokens"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": 5}, None),
    ({}, "prompt"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "n": 100000}, "n"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "stop": ["s"] * 65}, "stop"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [1, 2, 100000]}, "prompt"),
    ({"prompt": "x", "suffix": "y"}, "suffix"),
    ({"prompt": "x", "response_format": {"type": "json_object"}}, "response_format"),
    ({"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"name": "a"}}}, "response_format"),
    ({"prompt": "x", "use_beam_search": True}, "use_beam_search"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "echo": True, "logprobs": 1, "stream": True}, "echo"),
    ({"prompt": "x", "allowed_token_ids": [3, 256]}, "allowed_token_ids"),
    ({"prompt": "x", "logit_bias": {"300": 1.0}}, "logit_bias"),
    ({"prompt": "x", "stop_token_ids": [10**6]}, "stop_token_ids"),
])
def test_invalid_completion_fields_are_400_naming_the_field(server, body, param):
    err = _error(_post(server, "/v1/completions", body), 400)
    if param is not None:
        assert err["param"] == param or (err["param"] or "").startswith(param), err


def test_prompt_plus_max_tokens_over_max_model_len(server):
    rng = random.Random(0)
    ids = [rng.randrange(1, 200) for _ in range(rng.randint(20, 60))]
    ok = _post(server, "/v1/completions", {"prompt": ids, "max_tokens": 128 - len(ids), "temperature": 0})
    assert ok.status_code == 200, ok.text
    err = _error(_post(server, "/v1/completions", {"prompt": ids, "max_tokens": 129 - len(ids)}), 400, "max_tokens")
    assert "128" in err["message"] and str(len(ids)) in err["message"]
    _error(_post(server, "/v1/completions", {"prompt": [7] * 128, "max_tokens": 1}), 400, "prompt")
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 500}
    _error(_post(server, "/v1/chat/completions", chat), 400, "max_completion_tokens")


def test_chat_specific_errors(server):
    _error(_post(server, "/v1/chat/completions", {"messages": []}), 400, "messages")
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}
    _error(_post(server, "/v1/chat/completions", image), 400, "messages.0.content")
    _error(_post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2}),
           400, "top_logprobs")
    _error(_post(server, "/v1/chat/completions", {"messages": "hello"}), 400, "messages")
    ok = _post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "max_tokens": 2,
                                                "response_format": {"type": "text"}})
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["role"] == "assistant"


def test_api_key_required_except_health_and_metrics(server):
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": server.api_key}):
        r = httpx.get(server.url + "/v1/models", headers=headers)
        _error(r, 401)
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "x"}, headers=headers)
        _error(r, 401)
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200
    assert httpx.get(server.url + "/v1/models", headers=server.headers).status_code == 200


def test_unknown_model_route_and_method(server):
    _error(_post(server, "/v1/completions", {"model": "nope", "prompt": "x"}), 404, "model")
    _error(_post(server, "/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
           404, "model")
    _error(httpx.get(server.url + "/v1/nothing", headers=server.headers), 404)
    _error(httpx.get(server.url + "/v1/completions", headers=server.headers), 405)


def test_unknown_fields_are_listed_in_a_header(server):
    r = _post(server, "/v1/completions", {"prompt": "x", "max_tokens": 2, "guided_json": {}, "zzz": 1})
    assert r.status_code == 200
    assert r.headers["x-blocks-ignored-fields"] == "guided_json,zzz"
    assert "x-blocks-ignored-fields" not in _post(server, "/v1/completions", {"prompt": "x", "max_tokens": 2}).headers


@pytest.mark.parametrize("route,body", [
    ("/v1/completions", {"prompt": "x", "max_tokens": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
])
def test_unknown_field_names_cannot_break_the_header(server, route, body):
    """A client's field name with control characters, or a very long one, must not make the warning header
    invalid (uvicorn then dropped the connection without a response)."""
    r = _post(server, route, {**body, "\u001f\n": None, "b" * 5000: 1})
    assert r.status_code == 200
    value = r.headers["x-blocks-ignored-fields"]
    assert value.startswith("%1F%0A,bbb") and value.endswith("...") and len(value) <= 1027


def test_detokenize_rejects_out_of_vocabulary_ids(server):
    _error(_post(server, "/detokenize", {"tokens": [1, -3]}), 400, "tokens")
    _error(_post(server, "/tokenize", {}), 400)


def test_server_still_healthy_after_bad_input(server):
    assert httpx.get(server.url + "/health").status_code == 200
    r = _post(server, "/v1/completions", {"prompt": "The quick", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_body_over_the_size_limit_is_refused(server):
    from tests.serve.conftest import MAX_BODY

    big = {"prompt": "fox " * (MAX_BODY // 4 + 10), "max_tokens": 1}
    err = _error(_post(server, "/v1/completions", big), 413)
    assert str(MAX_BODY) in err["message"]

    def chunks():
        yield b'{"prompt": "'
        for _ in range(MAX_BODY // 4096 + 2):
            yield b"a" * 4096
        yield b'"}'

    r = httpx.post(server.url + "/v1/completions", content=chunks(), headers={**server.headers,
                                                                             "content-type": "application/json"})
    assert r.status_code in (400, 413) and r.json()["error"]["code"] == r.status_code
    assert httpx.get(server.url + "/health").status_code == 200


@pytest.mark.parametrize("size", [40 << 10, 256 << 10])
def test_oversized_headers_are_refused_and_harmless(server, size):
    """Request heads over 32 KiB get 431 from the app (whatever parser uvicorn runs: h11 may refuse
    first with 400 or a reset), never a crash."""
    try:
        r = httpx.get(server.url + "/v1/models", headers={**server.headers, "x-big": "a" * size})
        assert r.status_code in (400, 431)
        if r.status_code == 431:
            assert r.json()["error"]["code"] == 431 and "32768" in r.json()["error"]["message"]
    except httpx.TransportError:
        pass  # connection reset while the client was still sending the head
    assert httpx.get(server.url + "/health").status_code == 200

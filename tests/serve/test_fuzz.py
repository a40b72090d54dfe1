"""Random request bodies (hypothesis) against the real server: never a 5xx, always OpenAI's error shape,
and the server stays healthy. (A stand-in until the schemathesis run over the OpenAPI schema lands.)"""

from __future__ import annotations

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.integers(-3, 300),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12))
values = st.one_of(scalars, st.lists(scalars, max_size=4), st.lists(st.integers(-2, 300), max_size=6),
                   st.dictionaries(st.text(max_size=5), scalars, max_size=3))
small = st.one_of(st.integers(-3, 6), st.none(), st.text(max_size=3), st.floats(-2, 3))
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", ""])},
                                optional={"content": st.one_of(st.text(max_size=20), st.none(), st.integers(),
                                                               st.lists(st.fixed_dictionaries(
                                                                   {"type": st.sampled_from(["text", "image_url"]),
                                                                    "text": st.text(max_size=8)}), max_size=2))})
# valid-looking values mixed with wrong types and out-of-range ones
VALID = {
    "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1), "top_k": st.integers(-1, 50),
    "min_p": st.floats(0, 1), "stop": st.one_of(st.text(min_size=1, max_size=3), st.lists(st.text(max_size=3),
                                                                                      max_size=3)),
    "seed": st.integers(0, 2**31), "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.5, 2), "logit_bias": st.dictionaries(
        st.integers(0, 300).map(str), st.floats(-100, 100), max_size=3),
    "stop_token_ids": st.lists(st.integers(0, 300), max_size=3), "ignore_eos": st.booleans(),
    "min_tokens": st.integers(0, 4), "stream": st.booleans(), "priority": st.integers(-5, 5),
    "response_format": st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "xml"])}),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "include_stop_str_in_output": st.booleans(), "allowed_token_ids": st.lists(st.integers(0, 300), max_size=4),
    "bad_words": st.lists(st.text(max_size=4), max_size=2), "truncate_prompt_tokens": st.integers(-1, 10),
    "skip_special_tokens": st.booleans(), "user": st.text(max_size=5), "model": st.sampled_from(["tiny", "x"]),
    "n": st.integers(0, 3), "prompt_logprobs": st.integers(-1, 3), "unknown_field": values,
}
FIELDS = {k: st.one_of(v, values) for k, v in VALID.items()}


def _with_some(base: dict, extra: dict):
    keys = sorted({**FIELDS, **extra})
    strategies = {**FIELDS, **extra}
    return st.lists(st.sampled_from(keys), max_size=4, unique=True).flatmap(
        lambda ks: st.fixed_dictionaries({**base, **{k: strategies[k] for k in ks}}))


completion = _with_some(
    {"prompt": st.one_of(st.text(min_size=1, max_size=30), st.lists(st.integers(0, 255), min_size=1, max_size=8)),
     "max_tokens": st.integers(1, 6)},
    {"prompt": values, "max_tokens": small, "echo": values, "logprobs": st.one_of(st.integers(-1, 4), values),
     "suffix": values, "best_of": small},
)
chat = _with_some(
    {"messages": st.lists(message, min_size=1, max_size=3), "max_tokens": st.integers(1, 6)},
    {"messages": values, "logprobs": st.one_of(st.booleans(), values), "top_logprobs": small,
     "max_completion_tokens": small},
)


def _check(server, path: str, body: dict) -> None:
    r = httpx.post(server.url + path, json=body, headers=server.headers, timeout=60)
    assert r.status_code < 500, (body, r.status_code, r.text[:500])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert err["code"] == r.status_code and isinstance(err["message"], str)
    elif "text/event-stream" in r.headers.get("content-type", ""):
        assert r.text.rstrip().endswith("data: [DONE]") and '"error"' not in r.text, r.text[-300:]


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=completion)
def test_fuzz_completions(server, body):
    _check(server, "/v1/completions", body)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=chat)
def test_fuzz_chat(server, body):
    _check(server, "/v1/chat/completions", body)


def test_server_healthy_and_idle_after_fuzzing(server):
    assert httpx.get(server.url + "/health").status_code == 200
    m = server.metrics()
    assert m["blocks:kv_cache_usage_perc"] == 0 and m["blocks:num_requests_running"] == 0

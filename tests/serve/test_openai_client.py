"""The official ``openai`` client (sync, async, streaming, max_retries=0) against the real server."""

from __future__ import annotations

import asyncio
import random

import httpx
import openai
import pytest

WORDS = ["The", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "Paris", "capital", "France", "café",
         "naïve", "日本", "🙂", "Numbers", "12345", "STOP", "here", "end"]


def _prompt(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def aclient_kwargs(server):
    return dict(base_url=server.base_url, api_key=server.api_key, max_retries=0, timeout=60)


def _tokenize(server, text: str) -> list[int]:
    r = httpx.post(server.url + "/tokenize", json={"prompt": text}, headers=server.headers)
    assert r.status_code == 200
    return r.json()["tokens"]


def test_models_lists_the_served_name(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert models.data[0].max_model_len == 128  # vLLM's extra field


def test_completion_usage_and_length(client, server):
    rng = random.Random(1)
    prompt = _prompt(rng, 5)
    max_tokens = rng.choice([3, 7, 11])
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.object == "text_completion" and out.id.startswith("cmpl-")
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == len(_tokenize(server, prompt))
    assert out.usage.completion_tokens == max_tokens
    assert out.usage.total_tokens == out.usage.prompt_tokens + max_tokens


@pytest.mark.parametrize("max_tokens", [1, 9, 17])
def test_streamed_completion_concatenates_to_the_full_text(client, max_tokens):
    rng = random.Random(max_tokens)
    prompt = _prompt(rng, rng.randint(1, 9))
    kwargs = dict(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == max_tokens
    assert all(c.usage is None for c in chunks[:-1])
    body = chunks[:-1]
    assert "".join(c.choices[0].text for c in body) == full.choices[0].text
    finishes = [c.choices[0].finish_reason for c in body if c.choices[0].finish_reason is not None]
    assert finishes == ["length"] and body[-1].choices[0].finish_reason == "length"


def test_multiple_prompts_and_n_choices_are_indexed(client):
    rng = random.Random(7)
    prompts = [_prompt(rng, k) for k in (2, 5, 3)]
    out = client.completions.create(model="tiny", prompt=prompts, max_tokens=4, n=2, temperature=0.8, seed=3,
                                    extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == list(range(6))
    assert out.usage.completion_tokens == 6 * 4
    greedy = [client.completions.create(model="tiny", prompt=p, max_tokens=4, temperature=0).choices[0].text
              for p in prompts]
    batched = client.completions.create(model="tiny", prompt=prompts, max_tokens=4, temperature=0)
    assert [c.text for c in sorted(batched.choices, key=lambda c: c.index)] == greedy


def test_streamed_n_choices_each_finish_exactly_once(client):
    chunks = list(client.completions.create(model="tiny", prompt="The quick", max_tokens=6, n=3, temperature=1.0,
                                            seed=5, stream=True, extra_body={"ignore_eos": True}))
    finishes = {}
    texts = {i: "" for i in range(3)}
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.text
            if ch.finish_reason is not None:
                finishes[ch.index] = finishes.get(ch.index, 0) + 1
    assert finishes == {0: 1, 1: 1, 2: 1}


def test_stop_string_truncates_text_streamed_and_not(client):
    rng = random.Random(11)
    prompt = _prompt(rng, 4)
    base = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    assert len(base) >= 6, base
    cut = rng.randint(2, len(base) - 3)
    stop = base[cut:cut + 2]
    expected = base[: base.index(stop)]
    kwargs = dict(model="tiny", prompt=prompt, max_tokens=24, temperature=0, stop=[stop],
                  extra_body={"ignore_eos": True})
    out = client.completions.create(**kwargs).choices[0]
    assert out.text == expected and out.finish_reason == "stop"
    assert out.model_extra["stop_reason"] == stop
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kwargs))
    assert streamed == expected


def test_completion_logprobs(client):
    out = client.completions.create(model="tiny", prompt="Paris is", max_tokens=5, temperature=0, logprobs=3,
                                    extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(1 <= len(t) <= 4 for t in lp.top_logprobs)
    # greedy: the chosen token is the most likely one
    assert all(v >= max(t.values()) - 1e-5 for v, t in zip(lp.token_logprobs, lp.top_logprobs))
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_echo_with_logprobs_covers_prompt_and_output(client, server):
    rng = random.Random(12)
    prompt = _prompt(rng, 4)
    n_prompt = len(_tokenize(server, prompt))
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=3, temperature=0, logprobs=1, echo=True,
                                    extra_body={"ignore_eos": True})
    choice = out.choices[0]
    plain = client.completions.create(model="tiny", prompt=prompt, max_tokens=3, temperature=0,
                                      extra_body={"ignore_eos": True}).choices[0].text
    assert choice.text == prompt + plain
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == n_prompt + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    assert lp.text_offset == sorted(lp.text_offset)


def test_chat_nonstream_and_stream_agree(client):
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": "fox"}]}]
    kwargs = dict(model="tiny", messages=messages, max_completion_tokens=13, temperature=0,
                  extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kwargs)
    assert full.object == "chat.completion" and full.choices[0].message.role == "assistant"
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 13
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks[:-1] if c.choices[0].finish_reason]
    assert finishes == ["length"]


def test_chat_logprobs(client):
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "dog"}], max_tokens=4,
                                         temperature=0, logprobs=True, top_logprobs=2,
                                         extra_body={"ignore_eos": True})
    content = out.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.logprob <= 0
        assert abs(entry.logprob - entry.top_logprobs[0].logprob) < 1e-5


def test_async_client_concurrent_requests_match_sequential(client, aclient_kwargs):
    rng = random.Random(3)
    prompts = [_prompt(rng, rng.randint(1, 8)) for _ in range(5)]
    expected = [client.completions.create(model="tiny", prompt=p, max_tokens=6, temperature=0).choices[0].text
                for p in prompts]

    async def run():
        async with openai.AsyncOpenAI(**aclient_kwargs) as ac:
            async def one(p):
                stream = await ac.completions.create(model="tiny", prompt=p, max_tokens=6, temperature=0, stream=True)
                return "".join([c.choices[0].text async for c in stream if c.choices])

            return await asyncio.gather(*(one(p) for p in prompts))

    assert asyncio.run(run()) == expected


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt="x", max_tokens=10_000)
    assert err.value.status_code == 400 and "maximum context length" in str(err.value)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    bad = openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_metrics_count_tokens_of_a_request(client, server):
    before = server.metrics()
    out = client.completions.create(model="tiny", prompt="quick brown fox", max_tokens=7, temperature=0,
                                    extra_body={"ignore_eos": True})
    after = server.metrics()

    def grew(name, since=before, now=None):
        return (now or after).get(name, 0.0) - since.get(name, 0.0)

    assert grew("blocks:prompt_tokens_total") == out.usage.prompt_tokens
    assert grew("blocks:generation_tokens_total") == 7
    assert grew("blocks:request_success_total") == 1
    assert grew("blocks:e2e_request_latency_seconds_count") == 1
    assert grew("blocks:time_to_first_token_seconds_count") == 1
    assert grew("blocks:request_queue_time_seconds_count") == 1
    assert grew("blocks:inter_token_latency_seconds_count") == 6  # 7 tokens: 6 intervals after the first
    stream = client.completions.create(model="tiny", prompt="quick brown fox", max_tokens=5, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in stream if c.choices)
    assert grew("blocks:inter_token_latency_seconds_count", since=after, now=server.metrics()) == 4


def test_tokenize_detokenize_round_trip(server):
    rng = random.Random(5)
    text = _prompt(rng, 6)
    ids = httpx.post(server.url + "/tokenize", json={"prompt": text, "add_special_tokens": False},
                     headers=server.headers).json()["tokens"]
    back = httpx.post(server.url + "/detokenize", json={"tokens": ids}, headers=server.headers).json()["prompt"]
    assert back == text
    chat = httpx.post(server.url + "/tokenize", json={"messages": [{"role": "user", "content": text}]},
                      headers=server.headers).json()
    assert chat["count"] > len(ids) and chat["max_model_len"] == 128
    assert httpx.get(server.url + "/version").json()["version"]

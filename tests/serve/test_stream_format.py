"""The per-chunk fast paths write exactly what ``sse(dict)`` wrote, and the load generator's SSE parser
survives any split of the byte stream."""

from __future__ import annotations

import asyncio
import json
import random

from serve.streams import ChunkTemplate, json_value, sse, to_json


def test_chunk_template_matches_sse_of_the_whole_dict():
    rng = random.Random(0)
    texts = ["", "a", "héllo \"q\" \\ \n\t", "\u2028 emoji \U0001f600", "\x00choice\x00 inside the text", "</s>"]
    for base in ({"id": "cmpl-1", "object": "text_completion", "created": 17, "model": "m\u00e9"},
                 {"id": "chatcmpl-\"x\"", "created": 3, "model": "tiny", "object": "chat.completion.chunk",
                  "usage": None}):
        t = ChunkTemplate(base)
        for _ in range(50):
            choice = {"index": rng.randrange(300), "text": rng.choice(texts), "logprobs": None,
                      "finish_reason": rng.choice([None, "length", "stop"]),
                      "stop_reason": rng.choice([None, 7, "stop\u00e9"])}
            assert t.event(to_json(choice)).encode() == sse({**base, "choices": [choice]})
            fast = (f'{{"index":{choice["index"]},"text":{to_json(choice["text"])},"logprobs":null,'
                    f'"finish_reason":{to_json(choice["finish_reason"])},"stop_reason":{to_json(choice["stop_reason"])}}}')
            assert fast == to_json(choice)
    for v in (None, "", "length", "stop", "abort", 0, 7, "x\n\u00e9\"", "null", 1.5):
        assert json_value(v) == to_json(v)


def _feed(chunks: list[bytes]):
    from serve.bench import RequestResult, _StreamProtocol

    class T:
        def write(self, data):
            pass

        def close(self):
            pass

    async def go():
        res = RequestResult(ok=False)
        done = asyncio.get_running_loop().create_future()
        p = _StreamProtocol(b"", res, 0.0, done)
        p.connection_made(T())
        for c in chunks:
            p.data_received(c)
        p.connection_lost(None)
        return res, "".join(p.text), done.done()

    return asyncio.run(go())


def test_load_generator_parses_chunked_sse_split_anywhere():
    events = [sse({"id": "c", "choices": [{"index": 0, "text": t}], "usage": None}) for t in ("ab", "", "c\n\nd")]
    events.append(sse({"id": "c", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3}}))
    events.append(b"data: [DONE]\n\n")
    body = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"
    raw = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n" + body
    rng = random.Random(1)
    for trial in range(200):
        cuts = sorted(rng.sample(range(1, len(raw)), rng.randint(0, 12))) if trial else []
        pieces = [raw[a:b] for a, b in zip([0] + cuts, cuts + [len(raw)])]
        res, text, done = _feed(pieces)
        assert done and not res.error, (cuts, res.error)
        assert text == "abc\n\nd" and res.prompt_tokens == 5 and res.output_tokens == 3
        assert len(res.itl) == 2  # three chunks with a choice: the first gives TTFT, two gaps after it


def test_load_generator_reports_an_error_response():
    body = json.dumps({"error": {"message": "bad"}}).encode()
    res, _, done = _feed([b"HTTP/1.1 401 Unauthorized\r\ncontent-length: %d\r\n\r\n" % len(body), body])
    assert done and res.error.startswith("HTTP 401") and "bad" in res.error
    res, _, done = _feed([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nda"])
    assert done and "closed before the response ended" in res.error
    ev = sse({"choices": [{"index": 0, "text": "z"}], "usage": {"prompt_tokens": 1, "completion_tokens": 1}})
    res, text, done = _feed([b"HTTP/1.0 200 OK\r\n\r\n" + ev])  # a body that ends with the connection
    assert done and not res.error and text == "z" and res.output_tokens == 1

"""``POST /v1/completions``: prompts as text, text lists, token ids or lists of them; SSE streaming.

Each prompt becomes one engine request (``n`` choices each); choice ``index`` is
``prompt_index * n + i`` like OpenAI. ``max_tokens`` defaults to 16 (capped by the context left),
``echo`` prepends the prompt text (with ``logprobs``, the prompt tokens' logprobs too; not yet when
streaming), ``logprobs`` (int) gives OpenAI's ``tokens`` / ``token_logprobs`` / ``top_logprobs`` /
``text_offset`` lists. ``suffix`` (fill-in-the-middle) is
rejected with a 400 naming it.
"""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from serve.errors import APIError
from serve.protocol import CompletionRequest
from serve.sampling import build_params, check_length, check_prompt_ids, check_request, ignored_fields_header
from serve.state import ServerState
from serve.streams import (
    ChoiceState,
    ChunkTemplate,
    ClientDisconnected,
    MergedStreams,
    json_value,
    run_until_disconnected,
    sse,
    sse_body,
    to_json,
    tracked,
)

__all__ = ["router", "completion_logprobs"]

router = APIRouter()
_DEFAULT_MAX_TOKENS = 16


def completion_logprobs(token_ids: list[int], entries: list, *, offset: int) -> dict:
    """OpenAI's completions ``logprobs`` object for ``token_ids`` (``entries``: one ``{id: Logprob}`` each)."""
    tokens, values, tops, offsets = [], [], [], []
    for tid, entry in zip(token_ids, entries):
        chosen = entry.get(tid)
        text = (chosen.decoded_token if chosen is not None else None) or ""
        tokens.append(text)
        values.append(None if chosen is None else chosen.logprob)
        tops.append({(lp.decoded_token or ""): lp.logprob for lp in entry.values()})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def _prompts(req: CompletionRequest, state: ServerState) -> list[tuple[str | None, list[int]]]:
    p = req.prompt
    if isinstance(p, str):
        items: list = [p]
    elif not p:
        raise APIError(400, "prompt must not be empty", param="prompt")
    elif isinstance(p[0], int):  # validated as list[int] (a union member takes only ints), no per-id scan
        items = [list(p)]
    else:
        items = list(p)
    out = []
    for item in items:
        if isinstance(item, str):
            if not item:
                raise APIError(400, "prompt must not be an empty string", param="prompt")
            ids = state.tokenizer.encode(item, add_special_tokens=req.add_special_tokens)
            text = item
        else:
            ids, text = list(item), None
        if req.truncate_prompt_tokens is not None:
            ids = ids[-req.truncate_prompt_tokens:]
        check_prompt_ids(ids, state)
        out.append((text, ids))
    return out


@router.post("/v1/completions")
async def create_completion(req: CompletionRequest, raw: Request):
    """OpenAI's completions endpoint (see the module docstring)."""
    state: ServerState = raw.app.state.server
    unknown = check_request(req, state)
    if req.suffix is not None:
        raise APIError(400, "suffix is not supported: this server does not do fill-in-the-middle; "
                            "remove the suffix field", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise APIError(400, f"best_of must equal n (={req.n}) for now, got {req.best_of}", param="best_of")
    echo_logprobs = req.echo and req.logprobs is not None
    if echo_logprobs and req.stream:
        raise APIError(400, "echo together with logprobs is not supported for streaming yet", param="echo")
    prompts = _prompts(req, state)
    base = req.request_id or f"cmpl-{uuid.uuid4().hex}"
    gens = []
    for i, (text, ids) in enumerate(prompts):
        wanted = req.max_tokens
        if wanted is None:
            wanted = min(_DEFAULT_MAX_TOKENS, max(state.max_model_len - len(ids), 1))
        max_tokens = check_length(len(ids), wanted, state)
        params = build_params(req, max_tokens=max_tokens, logprobs=req.logprobs, state=state)
        if echo_logprobs:  # the prompt's own logprobs are needed for the echoed tokens
            params = params.clone(prompt_logprobs=max(req.logprobs, req.prompt_logprobs or 0))
        gens.append(tracked(state, f"{base}-{i}", ids, params, prompt=text, priority=req.priority,
                            stream=req.stream))
    merged = MergedStreams(gens)
    headers = ignored_fields_header(unknown)
    ctx = _Ctx(base, int(time.time()), state.model_name, req, prompts, state.tokenizer if echo_logprobs else None)
    ctx.ids_only = getattr(state.engine, "tokenizer", None) is None
    if req.stream:
        try:
            await run_until_disconnected(raw, merged.start())
        except ClientDisconnected:
            await merged.aclose()
            return Response(status_code=499)
        return StreamingResponse(_stream(ctx, merged), media_type="text/event-stream", headers=headers)
    try:
        choices = await run_until_disconnected(raw, _collect(ctx, merged))
    except ClientDisconnected:
        return Response(status_code=499)
    finally:
        await merged.aclose()
    return JSONResponse(_response(ctx, choices), headers=headers)


class _Ctx:
    def __init__(self, rid: str, created: int, model: str, req: CompletionRequest, prompts, tokenizer) -> None:
        self.rid, self.created, self.model, self.req, self.prompts = rid, created, model, req, prompts
        self.n = req.n
        self.tokenizer = tokenizer  # set when echoed prompt tokens need logprobs
        # no tokenizer (skip_tokenizer_init): outputs have no text, so a stream sends a chunk per step with new tokens
        self.ids_only = False
        self.prompt_logprobs: dict[int, list] = {}

    def usage(self, choices: dict[int, ChoiceState]) -> dict:
        prompt_tokens = sum(len(ids) for _, ids in self.prompts)
        completion = sum(len(c.token_ids) for c in choices.values())
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}


async def _collect(ctx: _Ctx, merged: MergedStreams) -> dict[int, ChoiceState]:
    await merged.start()
    choices = {i * ctx.n + j: ChoiceState() for i in range(len(ctx.prompts)) for j in range(ctx.n)}
    async for i, out in merged:
        for c in out.outputs:
            choices[i * ctx.n + c.index].add(c)
        if out.prompt_logprobs is not None:
            ctx.prompt_logprobs[i] = out.prompt_logprobs
    return choices


def _prompt_logprobs(ctx: _Ctx, i: int, *, top: int) -> dict:
    """The echoed prompt's part of a completions ``logprobs`` object (the first token has no logprob)."""
    ids = ctx.prompts[i][1]
    entries = ctx.prompt_logprobs.get(i) or [None] * len(ids)
    first = ctx.tokenizer.decode([ids[0]])
    rest = completion_logprobs(ids[1:], [e or {} for e in entries[1:]], offset=len(first))
    rest["top_logprobs"] = [dict(sorted(t.items(), key=lambda kv: -kv[1])[: top + 1]) for t in rest["top_logprobs"]]
    return {"tokens": [first] + rest["tokens"], "token_logprobs": [None] + rest["token_logprobs"],
            "top_logprobs": [None] + rest["top_logprobs"], "text_offset": [0] + rest["text_offset"]}


def _response(ctx: _Ctx, choices: dict[int, ChoiceState]) -> dict:
    out = []
    for idx in sorted(choices):
        st = choices[idx]
        prompt_text = ctx.prompts[idx // ctx.n][0]
        text = (prompt_text or "") + st.text if ctx.req.echo else st.text
        lps = None
        if ctx.req.logprobs is not None and st.logprobs is not None:
            lps = completion_logprobs(st.token_ids, st.logprobs, offset=len(prompt_text or "") if ctx.req.echo else 0)
            if ctx.req.echo:
                head = _prompt_logprobs(ctx, idx // ctx.n, top=ctx.req.logprobs)
                lps = {key: head[key] + lps[key] for key in lps}
        out.append({"index": idx, "text": text, "logprobs": lps, "finish_reason": st.finish_reason,
                    "stop_reason": st.stop_reason})
    return {"id": ctx.rid, "object": "text_completion", "created": ctx.created, "model": ctx.model,
            "choices": out, "usage": ctx.usage(choices)}


def _stream(ctx: _Ctx, merged: MergedStreams):
    opts = ctx.req.stream_options
    include_usage = bool(opts and opts.include_usage)
    choices = {i * ctx.n + j: ChoiceState() for i in range(len(ctx.prompts)) for j in range(ctx.n)}
    echoed: set[int] = set()
    base = {"id": ctx.rid, "object": "text_completion", "created": ctx.created, "model": ctx.model}
    template = ChunkTemplate({**base, "usage": None} if include_usage else base)
    echo, want_logprobs, ids_only, n = ctx.req.echo, ctx.req.logprobs is not None, ctx.ids_only, ctx.n

    def step_events(i, out) -> list[str]:
        events = []
        for c in out.outputs:
            idx = i * n + c.index
            st = choices[idx]
            offset = st.num_chars
            st.add(c)
            text = c.text
            if echo and idx not in echoed:
                echoed.add(idx)
                text = (ctx.prompts[i][0] or "") + text
            want_lp = want_logprobs and c.logprobs is not None and bool(c.token_ids)
            if not text and c.finish_reason is None and not want_lp and not (ids_only and c.token_ids):
                continue  # nothing new yet (text held back until it cannot become a stop string)
            lps = to_json(completion_logprobs(c.token_ids, c.logprobs, offset=offset)) if want_lp else "null"
            events.append(template.event(
                f'{{"index":{idx},"text":{json_value(text)},"logprobs":{lps},'
                f'"finish_reason":{json_value(c.finish_reason)},"stop_reason":{json_value(c.stop_reason)}}}'))
        return events

    def usage() -> bytes:
        return sse({**base, "choices": [], "usage": ctx.usage(choices)})

    return sse_body(merged, step_events, last=usage if include_usage else None)

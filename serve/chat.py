"""``POST /v1/chat/completions``: messages rendered with the chat template; SSE streaming.

``content`` may be a string or a list of ``{"type": "text", "text": ...}`` parts (joined with
newlines; other part types are a 400). ``max_completion_tokens`` (or the older ``max_tokens``)
defaults to the rest of the context. ``logprobs`` + ``top_logprobs`` give OpenAI's
``logprobs.content`` list. In a stream the first chunk of each choice carries
``delta.role = "assistant"``, and exactly one chunk per choice carries its ``finish_reason``.
"""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from serve.errors import APIError
from serve.protocol import ChatCompletionRequest, ChatMessage
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

__all__ = ["router", "render_chat", "chat_logprobs"]

router = APIRouter()


def _conversation(messages: list[ChatMessage]) -> list[dict]:
    conv = []
    for k, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise APIError(400, f"messages[{k}].content: only text parts are supported, got type "
                                        f"{part.type!r}", param=f"messages.{k}.content")
                texts.append(part.text)
            content = "\n".join(texts)
        entry = {"role": m.role, "content": content or ""}
        if m.name is not None:
            entry["name"] = m.name
        conv.append(entry)
    return conv


def render_chat(state: ServerState, messages: list[ChatMessage], *, add_generation_prompt: bool = True,
                continue_final_message: bool = False, chat_template: str | None = None) -> str:
    """The prompt text of a conversation (the request's template, else the server's, else the tokenizer's)."""
    if not messages:
        raise APIError(400, "messages must not be empty", param="messages")
    tok = state.tokenizer
    kwargs = {"tokenize": False, "add_generation_prompt": add_generation_prompt and not continue_final_message}
    template = chat_template or state.chat_template
    if template is not None:
        kwargs["chat_template"] = template
    if continue_final_message:
        kwargs["continue_final_message"] = True
    try:
        return tok.apply_chat_template(_conversation(messages), **kwargs)
    except APIError:
        raise
    except Exception as exc:  # noqa: BLE001 - a template error is the request's fault
        raise APIError(400, f"could not apply the chat template: {type(exc).__name__}: {exc}",
                       param="messages") from None


def chat_logprobs(token_ids: list[int], entries: list, *, top: int) -> dict:
    """OpenAI's chat ``logprobs`` object: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""
    content = []
    for tid, entry in zip(token_ids, entries):
        chosen = entry.get(tid)
        text = (chosen.decoded_token if chosen is not None else None) or ""
        ranked = sorted(entry.items(), key=lambda kv: kv[1].rank if kv[1].rank is not None else 1 << 30)[:top]
        content.append({
            "token": text, "logprob": None if chosen is None else chosen.logprob, "bytes": list(text.encode()),
            "top_logprobs": [{"token": lp.decoded_token or "", "logprob": lp.logprob,
                              "bytes": list((lp.decoded_token or "").encode())} for _, lp in ranked],
        })
    return {"content": content}


@router.post("/v1/chat/completions")
async def create_chat_completion(req: ChatCompletionRequest, raw: Request):
    """OpenAI's chat completions endpoint (see the module docstring)."""
    state: ServerState = raw.app.state.server
    unknown = check_request(req, state)
    if req.echo:
        raise APIError(400, "echo is not supported for chat completions yet", param="echo")
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    if req.top_logprobs is not None and req.top_logprobs > state.max_logprobs:
        raise APIError(400, f"top_logprobs must be <= max_logprobs={state.max_logprobs}, got {req.top_logprobs}",
                       param="top_logprobs")
    text = render_chat(state, req.messages, add_generation_prompt=req.add_generation_prompt,
                       continue_final_message=req.continue_final_message, chat_template=req.chat_template)
    ids = state.tokenizer.encode(text, add_special_tokens=req.add_special_tokens)
    if req.truncate_prompt_tokens is not None:
        ids = ids[-req.truncate_prompt_tokens:]
    check_prompt_ids(ids, state, param="messages")
    field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    wanted = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_tokens = check_length(len(ids), wanted, state, param=field)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = build_params(req, max_tokens=max_tokens, logprobs=logprobs, state=state)
    rid = req.request_id or f"chatcmpl-{uuid.uuid4().hex}"
    merged = MergedStreams([tracked(state, rid, ids, params, prompt=text, priority=req.priority,
                                    stream=req.stream)])
    headers = ignored_fields_header(unknown)
    meta = {"id": rid, "created": int(time.time()), "model": state.model_name}
    if req.stream:
        try:
            await run_until_disconnected(raw, merged.start())
        except ClientDisconnected:
            await merged.aclose()
            return Response(status_code=499)
        return StreamingResponse(_stream(req, meta, len(ids), merged), media_type="text/event-stream",
                                 headers=headers)
    try:
        choices = await run_until_disconnected(raw, _collect(req.n, merged))
    except ClientDisconnected:
        return Response(status_code=499)
    finally:
        await merged.aclose()
    out = []
    for idx in sorted(choices):
        st = choices[idx]
        lps = chat_logprobs(st.token_ids, st.logprobs, top=req.top_logprobs or 0) if logprobs is not None else None
        out.append({"index": idx, "message": {"role": "assistant", "content": st.text}, "logprobs": lps,
                    "finish_reason": st.finish_reason, "stop_reason": st.stop_reason})
    completion = sum(len(c.token_ids) for c in choices.values())
    body = {**meta, "object": "chat.completion", "choices": out,
            "usage": {"prompt_tokens": len(ids), "completion_tokens": completion,
                      "total_tokens": len(ids) + completion}}
    return JSONResponse(body, headers=headers)


async def _collect(n: int, merged: MergedStreams) -> dict[int, ChoiceState]:
    await merged.start()
    choices = {j: ChoiceState() for j in range(n)}
    async for _, out in merged:
        for c in out.outputs:
            choices[c.index].add(c)
    return choices


def _stream(req: ChatCompletionRequest, meta: dict, num_prompt_tokens: int, merged: MergedStreams):
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    base = {**meta, "object": "chat.completion.chunk"}
    template = ChunkTemplate({**base, "usage": None} if include_usage else base)
    want_logprobs, top = req.logprobs, req.top_logprobs or 0
    generated = 0

    def step_events(_, out) -> list[str]:
        nonlocal generated
        events = []
        for c in out.outputs:
            generated += len(c.token_ids)
            want_lp = want_logprobs and c.logprobs is not None and bool(c.token_ids)
            if not c.text and c.finish_reason is None and not want_lp:
                continue
            delta = f'{{"content":{json_value(c.text)}}}' if c.text or c.finish_reason is None else "{}"
            lps = to_json(chat_logprobs(c.token_ids, c.logprobs, top=top)) if want_lp else "null"
            events.append(template.event(
                f'{{"index":{c.index},"delta":{delta},"logprobs":{lps},"finish_reason":{json_value(c.finish_reason)},'
                f'"stop_reason":{json_value(c.stop_reason)}}}'))
        return events

    def usage() -> bytes:
        return sse({**base, "choices": [], "usage": {"prompt_tokens": num_prompt_tokens, "completion_tokens": generated,
                                                     "total_tokens": num_prompt_tokens + generated}})

    roles = "".join(template.event(f'{{"index":{j},"delta":{{"role":"assistant","content":""}},"logprobs":null,'
                                   f'"finish_reason":null}}') for j in range(req.n)).encode()
    return sse_body(merged, step_events, first=roles, last=usage if include_usage else None)

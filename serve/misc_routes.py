"""Small routes: ``GET /v1/models``, ``/health``, ``/version``, ``/metrics``; ``POST /tokenize``, ``/detokenize``."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

import blocks
from serve.chat import render_chat
from serve.errors import APIError, error_response
from serve.protocol import DetokenizeRequest, TokenizeRequest
from serve.state import ServerState

__all__ = ["router"]

router = APIRouter()
_CREATED = int(time.time())


def _state(raw: Request) -> ServerState:
    return raw.app.state.server


@router.get("/v1/models")
async def list_models(raw: Request):
    state = _state(raw)
    data = [{"id": name, "object": "model", "created": _CREATED, "owned_by": "blocks",
             "root": state.engine.model_path, "parent": None, "max_model_len": state.max_model_len}
            for name in state.served_model_names]
    return {"object": "list", "data": data}


@router.get("/health")
async def health(raw: Request):
    """200 while the engine process is alive, 503 once it is gone."""
    engine = _state(raw).engine
    if engine.is_alive():
        return Response(status_code=200)
    return error_response(503, f"the engine is not running: {engine.dead_reason}")


@router.get("/version")
async def version():
    return {"version": blocks.__version__}


@router.get("/metrics")
async def metrics(raw: Request):
    return Response(_state(raw).metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.post("/tokenize")
async def tokenize(req: TokenizeRequest, raw: Request):
    """Token ids of ``prompt`` or of chat ``messages`` rendered with the template."""
    state = _state(raw)
    state.check_model(req.model)
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "give exactly one of prompt or messages", param="prompt")
    tok = state.tokenizer
    if req.messages is not None:
        text = render_chat(state, req.messages, add_generation_prompt=req.add_generation_prompt)
        ids = tok.encode(text, add_special_tokens=False)
    else:
        ids = tok.encode(req.prompt, add_special_tokens=req.add_special_tokens)
    body = {"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids}
    if req.return_token_strs:
        body["token_strs"] = tok.convert_ids_to_tokens(ids)
    return JSONResponse(body)


@router.post("/detokenize")
async def detokenize(req: DetokenizeRequest, raw: Request):
    state = _state(raw)
    state.check_model(req.model)
    vocab = state.engine.vocab_size
    bad = next((t for t in req.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is outside the vocabulary [0, {vocab})", param="tokens")
    return {"prompt": state.tokenizer.decode(req.tokens)}

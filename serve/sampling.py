"""From a request to engine inputs: ``SamplingParams``, prompt token ids, and the server's limits.

Every check raises :class:`~serve.errors.APIError` 400 naming the field (``param``) and the limit.
"""

from __future__ import annotations

from urllib.parse import quote

from blocks.sample.params import SamplingParams
from serve.errors import APIError
from serve.state import MAX_N, MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, ServerState

__all__ = ["check_request", "build_params", "check_length", "check_prompt_ids", "ignored_fields_header"]

_MAX_IGNORED_HEADER_CHARS = 1024


def check_request(req, state: ServerState) -> list[str]:
    """Checks shared by completions and chat; returns the unknown field names (for the warning header)."""
    state.check_model(req.model)
    unknown = req.unknown_fields()
    if unknown and state.strict_fields:
        raise APIError(400, f"unknown request field(s): {', '.join(unknown)} (the server runs with --strict-fields)",
                       param=unknown[0])
    if req.use_beam_search:
        raise APIError(400, "use_beam_search is not supported by the server yet; use the offline LLM.beam_search",
                       param="use_beam_search")
    rf = req.response_format
    if rf is not None and rf.type != "text":
        raise APIError(400, f"response_format type {rf.type!r} is not supported yet (structured output has not "
                            "landed); only 'text' is accepted", param="response_format")
    if not 1 <= req.n <= MAX_N:
        raise APIError(400, f"n must be between 1 and {MAX_N}, got {req.n}", param="n")
    stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise APIError(400, f"stop may hold at most {MAX_STOP_STRINGS} strings, got {len(stops)}", param="stop")
    if any(len(s) > MAX_STOP_STRING_CHARS for s in stops):
        raise APIError(400, f"each stop string must be at most {MAX_STOP_STRING_CHARS} characters", param="stop")
    if req.prompt_logprobs is not None and req.prompt_logprobs > state.max_logprobs:
        raise APIError(400, f"prompt_logprobs must be <= max_logprobs={state.max_logprobs}, got {req.prompt_logprobs}",
                       param="prompt_logprobs")
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed with stream=true", param="stream_options")
    return unknown


def ignored_fields_header(unknown: list[str]) -> dict[str, str] | None:
    """The ``x-blocks-ignored-fields`` response header for the unknown field names (None when there are
    none). Names come from the client, so they are percent-encoded (control characters would make the
    header invalid and drop the connection) and the list is cut at 1 KiB with a trailing ``...``."""
    if not unknown:
        return None
    value = ",".join(quote(name, safe="") for name in unknown)
    if len(value) > _MAX_IGNORED_HEADER_CHARS:
        value = value[: _MAX_IGNORED_HEADER_CHARS] + "..."
    return {"x-blocks-ignored-fields": value}


def build_params(req, *, max_tokens: int | None, logprobs: int | None, state: ServerState) -> SamplingParams:
    """``SamplingParams`` from the request (OpenAI defaults: temperature 1, top_p 1)."""
    if logprobs is not None and logprobs > state.max_logprobs:
        raise APIError(400, f"logprobs must be <= max_logprobs={state.max_logprobs}, got {logprobs}",
                       param="logprobs")
    kwargs = dict(
        n=req.n, temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p, top_k=0 if req.top_k is None else req.top_k,
        min_p=0.0 if req.min_p is None else req.min_p, presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty, seed=req.seed,
        stop=req.stop, stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos, max_tokens=max_tokens,
        min_tokens=req.min_tokens, logprobs=logprobs, prompt_logprobs=req.prompt_logprobs,
        skip_special_tokens=req.skip_special_tokens, spaces_between_special_tokens=req.spaces_between_special_tokens,
        include_stop_str_in_output=req.include_stop_str_in_output, logit_bias=req.logit_bias,
        allowed_token_ids=req.allowed_token_ids, bad_words=req.bad_words,
    )
    try:
        return SamplingParams(**kwargs)
    except ValueError as exc:
        message = str(exc)
        word = message.split(" ", 1)[0]
        raise APIError(400, message, param=word if word in kwargs else None) from None


def check_prompt_ids(ids: list[int], state: ServerState, *, param: str = "prompt") -> None:
    """Non-empty, in the vocabulary."""
    if not ids:
        raise APIError(400, "the prompt is empty (0 tokens)", param=param)
    vocab = state.engine.vocab_size
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is outside the vocabulary [0, {vocab})", param=param)


def check_length(num_prompt_tokens: int, max_tokens: int | None, state: ServerState, *,
                 param: str = "max_tokens") -> int:
    """Resolve ``max_tokens`` (``None``: the rest of the context) and enforce prompt + max_tokens <= max_model_len."""
    limit = state.max_model_len
    if num_prompt_tokens >= limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens. However, the prompt has "
                            f"{num_prompt_tokens} tokens, leaving no room for output. Please shorten the prompt.",
                       param="prompt" if param == "max_tokens" else "messages")
    if max_tokens is None:
        return limit - num_prompt_tokens
    if max_tokens < 1:
        raise APIError(400, f"{param} must be at least 1, got {max_tokens}", param=param)
    if num_prompt_tokens + max_tokens > limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                            f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the prompt, "
                            f"{max_tokens} in the completion). Please reduce the prompt or {param}.", param=param)
    return max_tokens

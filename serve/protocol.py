"""Request models of the OpenAI-compatible API (pydantic), with vLLM's extra sampling fields.

Only requests are modelled; responses are built as plain dicts in the route modules (they follow
OpenAI's shapes field for field). Unknown fields are kept in ``model_extra``: the routes either list
them in the ``x-blocks-ignored-fields`` response header or, under ``--strict-fields``, reject them.
Types are checked by pydantic (a wrong type is a 400, see :mod:`serve.errors`); value ranges are
checked by ``SamplingParams`` and :mod:`serve.sampling`, which name the field and the limit.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "StreamOptions", "ResponseFormat", "SamplingRequest", "CompletionRequest", "ChatMessage",
    "ChatCompletionRequest", "TokenizeRequest", "DetokenizeRequest",
]


class _Base(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())

    def unknown_fields(self) -> list[str]:
        """Names of request fields this server does not know (sorted)."""
        return sorted((self.model_extra or {}).keys())


class StreamOptions(_Base):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class ResponseFormat(_Base):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict | None = None


class SamplingRequest(_Base):
    """Fields shared by completions and chat completions (OpenAI's, then vLLM's extras)."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    # vLLM extras (``extra_body`` in the openai client)
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    prompt_logprobs: int | None = None
    priority: int = 0
    use_beam_search: bool = False
    length_penalty: float = 1.0
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    truncate_prompt_tokens: int | None = Field(default=None, ge=1)
    request_id: str | None = None


class CompletionRequest(SamplingRequest):
    """``POST /v1/completions``: ``prompt`` is a string, a list of strings, token ids or lists of them."""

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None
    add_special_tokens: bool = True


class TextPart(_Base):
    type: str
    text: str | None = None


class ChatMessage(_Base):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingRequest):
    """``POST /v1/chat/completions``: ``messages`` rendered with the chat template."""

    messages: list[ChatMessage]
    logprobs: bool = False
    top_logprobs: int | None = None
    max_completion_tokens: int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    echo: bool = False
    add_special_tokens: bool = False


class TokenizeRequest(_Base):
    """``POST /tokenize``: either ``prompt`` or chat ``messages``."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(_Base):
    """``POST /detokenize``."""

    model: str | None = None
    tokens: list[int]

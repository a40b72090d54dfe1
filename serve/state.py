"""What every route needs: the engine client, served names, limits and metrics (one per app)."""

from __future__ import annotations

from dataclasses import dataclass, field

from serve.errors import APIError
from serve.metrics import ServerMetrics

__all__ = ["ServerState", "MAX_N", "MAX_STOP_STRINGS", "MAX_STOP_STRING_CHARS"]

MAX_N = 128
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 1024


@dataclass
class ServerState:
    """Server-wide settings.

    Args:
        engine: an :class:`~blocks.engine.async_llm.AsyncLLM` (or a test double with the same API).
        served_model_names: names the API answers to; the first is reported in responses.
        api_key: required ``Bearer`` key for the API routes, or ``None``.
        max_logprobs: the largest ``logprobs`` / ``top_logprobs`` / ``prompt_logprobs`` accepted.
        chat_template: a Jinja template overriding the tokenizer's, or ``None``.
        strict_fields: reject unknown request fields (400) instead of listing them in a header.
    """

    engine: object
    served_model_names: list[str]
    api_key: str | None = None
    max_logprobs: int = 20
    chat_template: str | None = None
    strict_fields: bool = False
    metrics: ServerMetrics = field(init=False)

    def __post_init__(self) -> None:
        if not self.served_model_names:
            raise ValueError("served_model_names must not be empty")
        self.metrics = ServerMetrics(self.engine, self.served_model_names[0])

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    @property
    def tokenizer(self):
        tok = getattr(self.engine, "tokenizer", None)
        if tok is None:
            raise APIError(400, "this server runs without a tokenizer (skip_tokenizer_init): send token ids")
        return tok

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def check_model(self, name: str | None) -> None:
        """404 unless ``name`` is one of the served names (``None`` means the default)."""
        if name is not None and name not in self.served_model_names:
            raise APIError(404, f"The model `{name}` does not exist. Served models: {self.served_model_names}",
                           param="model")

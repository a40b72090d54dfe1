"""Request outputs with vLLM's field names (``RequestOutput``, ``CompletionOutput``, ``Logprob``).

Code written against vLLM's offline API reads these fields unchanged:
``out.outputs[0].text``, ``.token_ids``, ``.cumulative_logprob``, ``.logprobs``, ``.finish_reason``,
``.stop_reason``, ``out.prompt_logprobs``, ``out.finished``, ``out.metrics``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Logprob", "CompletionOutput", "RequestOutput", "RequestMetrics", "SampleLogprobs", "PromptLogprobs"]


@dataclass
class Logprob:
    """Log-probability of one token: its value, its rank in the vocabulary (1 = most likely) and
    its decoded text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One dict per position: token id -> Logprob (the sampled token plus the top-n).
SampleLogprobs = list[dict[int, Logprob]]
# Prompt logprobs: None for the first prompt token (it has no context), then one dict per token.
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass
class RequestMetrics:
    """Timestamps (``time.time()`` seconds) of a request's life, as vLLM reports them."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    time_in_queue: float | None = None
    num_preemptions: int = 0


@dataclass
class CompletionOutput:
    """One generated sequence of a request (``n > 1`` gives several, ``index`` 0..n-1).

    ``finish_reason`` is ``"stop"`` (EOS, stop token or stop string), ``"length"``
    (``max_tokens`` or ``max_model_len``) or ``"abort"``; ``None`` while running.
    ``stop_reason`` is the stop string or stop token id that ended it, else ``None``.
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: SampleLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    lora_request: object | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """The outputs of one request so far (streamed) or in full (finished)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: PromptLogprobs | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    num_cached_tokens: int = 0
    lora_request: object | None = None
    encoder_prompt: str | None = None
    encoder_prompt_token_ids: list[int] | None = None
    kv_transfer_params: dict | None = field(default=None, repr=False)

"""Sampling parameters with vLLM's field names, defaults and validation.

``SamplingParams`` describes how one request picks its next tokens; ``BeamSearchParams`` describes a
beam search. Both validate in ``__post_init__`` and raise ``ValueError`` naming the field and the
allowed range, so a bad request fails alone (the server turns it into a 400).

Semantics follow vLLM:

* ``temperature == 0`` (below ``1e-5``) means greedy; ``top_p``, ``top_k`` and ``min_p`` are then
  reset to their "off" values. Temperatures in ``(0, 0.01)`` are raised to ``0.01`` (smaller ones
  overflow in fp32 on real logits).
* ``top_k`` of ``0`` or ``-1`` disables top-k (``-1`` is normalised to ``0``).
* ``presence_penalty`` / ``frequency_penalty`` act on generated tokens only; ``repetition_penalty``
  acts on prompt and generated tokens (divides positive logits, multiplies negative ones).
* ``stop`` may be a string or a list; it is stored as a list. ``stop_token_ids`` likewise.
* ``logit_bias`` maps token id to a bias, clamped to ``[-100, 100]``.

Example::

    from blocks.sample.params import SamplingParams
    params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=64, seed=1234)
"""

from __future__ import annotations

import copy
import enum
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SamplingParams", "BeamSearchParams", "SamplingType", "SAMPLING_EPS", "MIN_TEMPERATURE"]

SAMPLING_EPS = 1e-5  # temperatures below this are greedy
MIN_TEMPERATURE = 1e-2  # non-greedy temperatures are raised to this


class SamplingType(enum.IntEnum):
    """How a request draws its tokens: exact argmax, random, or random from its own seeded stream."""

    GREEDY = 0
    RANDOM = 1
    RANDOM_SEED = 2


def _check_filters(p) -> None:
    """The sampling-filter fields ``SamplingParams`` and ``BeamSearchParams`` share (``top_k`` already mapped
    from -1 to 0)."""
    if not p.temperature >= 0.0:
        raise ValueError(f"temperature must be non-negative, got {p.temperature}.")
    if not 0.0 < p.top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {p.top_p}.")
    if not _is_int(p.top_k) or p.top_k < 0:
        raise ValueError(f"top_k must be 0 or -1 (disable), or at least 1, got {p.top_k!r}.")
    if not 0.0 <= p.min_p <= 1.0:
        raise ValueError(f"min_p must be in [0, 1], got {p.min_p}.")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value: Any, *, low: int | None = None, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not _is_int(value):
        raise ValueError(f"{name} must be an integer, got {value!r}.")
    if low is not None and value < low:
        raise ValueError(f"{name} must be at least {low}, got {value}.")


def _check_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}.")
    if value != value:  # NaN
        raise ValueError(f"{name} must not be NaN.")
    return float(value)


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, str | int):
        return [value]
    return list(value)


@dataclass
class SamplingParams:
    """Per-request sampling parameters (vLLM's names and defaults).

    Fields: ``n`` (sequences per prompt, >= 1), ``temperature`` (>= 0, 0 = greedy), ``top_p``
    (in (0, 1]), ``top_k`` (0 or -1 = off, else >= 1), ``min_p`` (in [0, 1]), ``presence_penalty`` and
    ``frequency_penalty`` (in [-2, 2]), ``repetition_penalty`` (> 0, 1 = off), ``seed`` (int or None),
    ``stop`` (strings), ``stop_token_ids``, ``include_stop_str_in_output``, ``ignore_eos``,
    ``max_tokens`` (>= 1 or None = up to the model length), ``min_tokens`` (0..max_tokens),
    ``logprobs`` (top-n per generated token, >= 0 or None), ``prompt_logprobs`` (>= 0 or None),
    ``logit_bias`` (token id -> bias), ``allowed_token_ids`` (non-empty list or None), ``bad_words``
    (strings, tokenized by the engine), ``skip_special_tokens``, ``spaces_between_special_tokens``,
    ``detokenize``, ``truncate_prompt_tokens`` (>= 1 or None).
    """

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    truncate_prompt_tokens: int | None = None
    # Filled by the engine: token-id sequences of ``bad_words`` (the sampler bans their last token
    # when the generated text ends with the others).
    bad_words_token_ids: list[list[int]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.stop = [s for s in _as_list(self.stop)]
        self.stop_token_ids = [int(t) for t in _as_list(self.stop_token_ids)]
        if self.top_k == -1:
            self.top_k = 0
        for name in ("presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "top_p", "min_p"):
            setattr(self, name, _check_number(name, getattr(self, name)))
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                kind = type(self.logit_bias).__name__
                raise ValueError(f"logit_bias must be a dict of token id -> bias, got {kind}.")
            bias = {}
            for tok, val in self.logit_bias.items():
                try:
                    tok_id = int(tok)  # JSON keys arrive as strings
                except (TypeError, ValueError) as err:
                    raise ValueError(f"logit_bias keys must be token ids, got {tok!r}.") from err
                bias[tok_id] = min(100.0, max(-100.0, _check_number("logit_bias", val)))
            self.logit_bias = bias
        self._verify()
        if 0.0 < self.temperature < MIN_TEMPERATURE:
            self.temperature = MIN_TEMPERATURE
        if self.temperature < SAMPLING_EPS:  # greedy: the filters are meaningless
            self.temperature, self.top_p, self.top_k, self.min_p = 0.0, 1.0, 0, 0.0

    def _verify(self) -> None:
        _check_int("n", self.n, low=1)
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}.")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}.")
        if not self.repetition_penalty > 0.0:
            raise ValueError(f"repetition_penalty must be greater than zero, got {self.repetition_penalty}.")
        _check_filters(self)
        _check_int("seed", self.seed, optional=True)
        _check_int("max_tokens", self.max_tokens, low=1, optional=True)
        _check_int("min_tokens", self.min_tokens, low=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, got {self.min_tokens}."
            )
        _check_int("logprobs", self.logprobs, low=0, optional=True)
        _check_int("prompt_logprobs", self.prompt_logprobs, low=0, optional=True)
        _check_int("truncate_prompt_tokens", self.truncate_prompt_tokens, low=1, optional=True)
        for s in self.stop:
            if not isinstance(s, str):
                raise ValueError(f"stop must be a string or a list of strings, got {s!r}.")
            if not s:
                raise ValueError("stop cannot contain an empty string.")
        for t in self.stop_token_ids:
            if t < 0:
                raise ValueError(f"stop_token_ids must be non-negative token ids, got {t}.")
        if self.logit_bias is not None and any(t < 0 for t in self.logit_bias):
            raise ValueError("logit_bias keys must be non-negative token ids.")
        if self.allowed_token_ids is not None:
            if len(self.allowed_token_ids) == 0:
                raise ValueError("allowed_token_ids must not be empty (use None to allow every token).")
            if any((not _is_int(t)) or t < 0 for t in self.allowed_token_ids):
                raise ValueError("allowed_token_ids must be non-negative integer token ids.")
        if self.bad_words is not None and any(not isinstance(w, str) or not w for w in self.bad_words):
            raise ValueError("bad_words must be a list of non-empty strings.")

    # ------------------------------------------------------------------ derived properties
    @property
    def sampling_type(self) -> SamplingType:
        """GREEDY when temperature is 0, RANDOM_SEED when a seed is set, else RANDOM."""
        if self.temperature < SAMPLING_EPS:
            return SamplingType.GREEDY
        return SamplingType.RANDOM_SEED if self.seed is not None else SamplingType.RANDOM

    @property
    def all_stop_token_ids(self) -> set[int]:
        """``stop_token_ids`` as a set (the engine adds the EOS id unless ``ignore_eos``)."""
        return set(self.stop_token_ids)

    def clone(self, **changes: Any) -> SamplingParams:
        """A deep copy with ``changes`` applied (and validated)."""
        new = copy.deepcopy(self)
        for key, value in changes.items():
            if not hasattr(new, key):
                raise ValueError(f"SamplingParams has no field {key!r}.")
            setattr(new, key, value)
        new.__post_init__()
        return new


_EARLY_STOPPING = (True, False, "never")


@dataclass
class BeamSearchParams:
    """Beam search parameters: vLLM's fields plus stochastic-beam filters and HF's ``early_stopping``.

    ``beam_width`` (>= 1), ``max_tokens`` (>= 1), ``ignore_eos``, ``temperature`` (>= 0; 0 = the
    deterministic beam search), ``length_penalty`` (any float; HF's definition: a finished
    hypothesis scores ``sum_logprobs / generated_len ** length_penalty``),
    ``include_stop_str_in_output``. Extensions: ``top_k`` / ``top_p`` / ``min_p`` (as in
    ``SamplingParams``; they make beams stochastic together with ``temperature > 0``),
    ``early_stopping`` (``True``, ``False`` or ``"never"``, HF's meaning) and ``seed``.
    """

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    early_stopping: bool | str = False
    seed: int | None = None

    def __post_init__(self) -> None:
        _check_int("beam_width", self.beam_width, low=1)
        _check_int("max_tokens", self.max_tokens, low=1)
        if self.top_k == -1:
            self.top_k = 0
        for name in ("temperature", "length_penalty", "top_p", "min_p"):
            setattr(self, name, _check_number(name, getattr(self, name)))
        _check_filters(self)
        if self.early_stopping not in _EARLY_STOPPING or isinstance(self.early_stopping, int | float) and not (
            isinstance(self.early_stopping, bool)
        ):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}.")
        _check_int("seed", self.seed, optional=True)

    @property
    def is_stochastic(self) -> bool:
        """True when candidates are sampled (temperature > 0) rather than taken by top score."""
        return self.temperature >= SAMPLING_EPS

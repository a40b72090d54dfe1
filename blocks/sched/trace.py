"""Synthetic request traces and a step-time cost model for the simulator.

A trace (:func:`make_trace`) is a :class:`Trace`: arrays of arrival times, prompt and output
lengths, priorities and shared-prefix groups, plus one token list per prefix group. Token ids of a
request are generated only when it is submitted (:meth:`Trace.prompt`), so a 100,000-request trace
costs a few MB until the simulator needs each prompt.

:class:`CostModel` turns one step's shape into seconds: the step streams the weights and the KV of
every scheduled request's context from memory (``bytes / bandwidth``) and does
``2 * params`` FLOPs per token plus attention FLOPs per (query, key) pair (``flops / flop_rate``);
the step takes the larger of the two (a roofline) plus a fixed overhead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = ["TraceConfig", "Trace", "make_trace", "CostModel", "MODEL_PRESETS"]

_DISTRIBUTIONS = ("fixed", "uniform", "exponential")
_POOL = 1 << 20  # random tokens that request bodies are sliced from


@dataclass(frozen=True, kw_only=True)
class TraceConfig:
    """How to draw a synthetic trace.

    Attributes:
        num_requests: requests in the trace.
        request_rate: mean arrivals per second of a Poisson process; ``inf`` = all arrive at t=0.
        prompt_len: mean prompt length (tokens), excluding the shared prefix.
        output_len: mean output length (tokens; the request stops there: ``max_tokens``, no EOS).
        distribution: ``"fixed"``, ``"uniform"`` (1 .. 2*mean-1) or ``"exponential"`` (>= 1), for both lengths.
        max_prompt_len / max_output_len: caps on the drawn lengths.
        num_prefix_groups: shared-prefix groups (0 = none); each group has its own random prefix.
        prefix_len: tokens of each group's shared prefix, prepended to the prompt.
        prefix_fraction: fraction of requests that belong to a group (chosen uniformly among groups).
        num_priorities: priorities drawn uniformly in ``[0, num_priorities)``.
        vocab_size: token ids are drawn in ``[1, vocab_size)``.
        seed: random seed.
    """

    num_requests: int = 1000
    request_rate: float = math.inf
    prompt_len: int = 256
    output_len: int = 128
    distribution: str = "uniform"
    max_prompt_len: int = 4096
    max_output_len: int = 4096
    num_prefix_groups: int = 0
    prefix_len: int = 0
    prefix_fraction: float = 1.0
    num_priorities: int = 1
    vocab_size: int = 32000
    seed: int = 0

    def __post_init__(self):
        for name in ("num_requests", "prompt_len", "output_len", "max_prompt_len", "max_output_len",
                     "num_priorities"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {self.vocab_size}")
        if self.max_prompt_len >= _POOL:
            raise ValueError(f"max_prompt_len must be < {_POOL}, got {self.max_prompt_len}")
        if not self.request_rate > 0:
            raise ValueError(f"request_rate must be > 0 (inf = all at once), got {self.request_rate}")
        if self.distribution not in _DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {_DISTRIBUTIONS}, got {self.distribution!r}")
        if self.num_prefix_groups < 0 or self.prefix_len < 0:
            raise ValueError("num_prefix_groups and prefix_len must be >= 0")
        if not 0.0 <= self.prefix_fraction <= 1.0:
            raise ValueError(f"prefix_fraction must be in [0, 1], got {self.prefix_fraction}")


@dataclass
class Trace:
    """A drawn trace. Arrays have shape ``[num_requests]``; ``group[i] = -1`` means no shared prefix.

    Attributes:
        arrival_time: float64 seconds, non-decreasing.
        prompt_len: int64 tokens after the prefix (>= 1).
        output_len: int64 tokens to generate (>= 1).
        priority: int64.
        group: int64 prefix group or -1.
        prefixes: one token list per group.
        seed: base seed of the per-request token draws.
        vocab_size: token ids lie in ``[1, vocab_size)``.
    """

    arrival_time: np.ndarray
    prompt_len: np.ndarray
    output_len: np.ndarray
    priority: np.ndarray
    group: np.ndarray
    prefixes: list[list[int]]
    seed: int = 0
    vocab_size: int = 32000
    _pool: list[int] | None = field(default=None, repr=False)
    _offsets: list[int] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.arrival_time)

    def prompt(self, i: int) -> list[int]:
        """Token ids of request ``i``'s prompt: its group's prefix (if any), then its own tokens.

        The own tokens start with two ids that encode ``i`` (so no two requests share a block by
        chance) followed by a slice of a shared random pool at a random offset (cheap to build).
        """
        n = int(self.prompt_len[i])
        if self._pool is None:
            rng = np.random.default_rng((self.seed, 0x5EED))
            self._pool = rng.integers(1, self.vocab_size, _POOL).tolist()
            self._offsets = rng.integers(0, _POOL - 2, len(self)).tolist()
        hi, lo = divmod(i, self.vocab_size - 1)
        body = [1 + hi % (self.vocab_size - 1), 1 + lo]
        if n > 2:
            off = self._offsets[i] % (_POOL - n)
            body += self._pool[off:off + n - 2]
        else:
            body = body[:n]
        g = int(self.group[i])
        return self.prefixes[g] + body if g >= 0 else body

    def total_prompt_len(self, i: int) -> int:
        g = int(self.group[i])
        return int(self.prompt_len[i]) + (len(self.prefixes[g]) if g >= 0 else 0)


def _lengths(rng: np.random.Generator, dist: str, mean: int, cap: int, n: int) -> np.ndarray:
    if dist == "fixed":
        out = np.full(n, mean, dtype=np.int64)
    elif dist == "uniform":
        out = rng.integers(1, 2 * mean, n, dtype=np.int64)
    else:
        out = np.ceil(rng.exponential(mean, n)).astype(np.int64)
    return np.clip(out, 1, cap)


def make_trace(config: TraceConfig) -> Trace:
    """Draw a trace from ``config`` (deterministic for a given seed)."""
    cfg = config
    rng = np.random.default_rng(cfg.seed)
    n = cfg.num_requests
    if math.isinf(cfg.request_rate):
        arrival = np.zeros(n)
    else:
        arrival = np.cumsum(rng.exponential(1.0 / cfg.request_rate, n))
    prompt = _lengths(rng, cfg.distribution, cfg.prompt_len, cfg.max_prompt_len, n)
    output = _lengths(rng, cfg.distribution, cfg.output_len, cfg.max_output_len, n)
    priority = rng.integers(0, cfg.num_priorities, n, dtype=np.int64)
    group = np.full(n, -1, dtype=np.int64)
    prefixes: list[list[int]] = []
    if cfg.num_prefix_groups and cfg.prefix_len:
        member = rng.random(n) < cfg.prefix_fraction
        group[member] = rng.integers(0, cfg.num_prefix_groups, int(member.sum()))
        prefixes = [rng.integers(1, cfg.vocab_size, cfg.prefix_len).tolist() for _ in range(cfg.num_prefix_groups)]
    return Trace(arrival, prompt, output, priority, group, prefixes, seed=cfg.seed, vocab_size=cfg.vocab_size)


@dataclass(frozen=True, kw_only=True)
class CostModel:
    """Roofline step time: ``overhead + max(bytes / bandwidth, flops / flop_rate)``.

    Attributes:
        weight_bytes: bytes of weights read once per step.
        kv_bytes_per_token: K and V bytes of one token over all layers (read for context, written for new).
        flops_per_token: dense FLOPs per computed token (about ``2 * params``).
        attn_flops_per_pair: attention FLOPs per (query token, context token) pair
            (``4 * num_layers * num_heads * head_dim``).
        bandwidth: memory bytes per second.
        flop_rate: FLOPs per second.
        step_overhead: fixed seconds per step (launches, host work).
    """

    weight_bytes: float
    kv_bytes_per_token: float = 0.0
    flops_per_token: float = 0.0
    attn_flops_per_pair: float = 0.0
    bandwidth: float = 3.0e12
    flop_rate: float = 7.0e14
    step_overhead: float = 0.0

    def __post_init__(self):
        if self.bandwidth <= 0 or self.flop_rate <= 0:
            raise ValueError(f"bandwidth and flop_rate must be > 0, got {self.bandwidth}, {self.flop_rate}")

    def step_time(self, num_tokens: int, num_context_tokens: int, num_attn_pairs: int) -> float:
        """Seconds for a step computing ``num_tokens`` tokens whose contexts total ``num_context_tokens``
        (KV read) with ``num_attn_pairs`` (query, key) pairs; 0 for an empty step."""
        if num_tokens == 0:
            return 0.0
        mem = (self.weight_bytes + (num_context_tokens + num_tokens) * self.kv_bytes_per_token) / self.bandwidth
        comp = (num_tokens * self.flops_per_token + num_attn_pairs * self.attn_flops_per_pair) / self.flop_rate
        return self.step_overhead + max(mem, comp)

    @classmethod
    def for_model(cls, name: str, *, bandwidth: float = 3.0e12, flop_rate: float = 7.0e14,
                  step_overhead: float = 0.0) -> CostModel:
        """A cost model for a preset of :data:`MODEL_PRESETS` (bf16 weights and KV)."""
        if name not in MODEL_PRESETS:
            raise ValueError(f"model must be one of {sorted(MODEL_PRESETS)}, got {name!r}")
        params, layers, heads, kv_heads, head_dim = MODEL_PRESETS[name]
        return cls(weight_bytes=2.0 * params, kv_bytes_per_token=2.0 * 2 * layers * kv_heads * head_dim,
                   flops_per_token=2.0 * params, attn_flops_per_pair=4.0 * layers * heads * head_dim,
                   bandwidth=bandwidth, flop_rate=flop_rate, step_overhead=step_overhead)


#: name -> (parameters, layers, query heads, kv heads, head_dim)
MODEL_PRESETS: dict[str, tuple[float, int, int, int, int]] = {
    "llama-3-8b": (8.03e9, 32, 32, 8, 128),
    "qwen2.5-1.5b": (1.54e9, 28, 12, 2, 128),
    "qwen2.5-0.5b": (0.49e9, 24, 14, 2, 64),
    "llama-2-7b": (6.74e9, 32, 32, 32, 128),
}

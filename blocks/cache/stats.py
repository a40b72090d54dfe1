"""Counters of the KV cache manager: prefix-cache queries, hits, evictions and actionable miss reasons."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

__all__ = ["CacheStats", "MissReason"]


class MissReason:
    """Why a prefix lookup found no cached block, phrased so a user can act on it.

    The strings are the keys of :attr:`CacheStats.miss_reasons`.
    """

    CACHING_DISABLED = "prefix caching disabled (enable_prefix_caching=False)"
    PROMPT_TOO_SHORT = "prompt shorter than one block plus one token (the last token is always recomputed)"
    NO_SHARED_PREFIX = "no cached first block: shared prefix with earlier requests shorter than one block"
    EVICTED = "prefix was cached but evicted (cache too small for the working set)"
    DIFFERENT_EXTRA_KEYS = "same tokens cached under different extra keys (different cache salt or LoRA adapter)"
    HASH_COLLISION = "block hash matched but the content differs: collision detected and rejected"


@dataclass
class CacheStats:
    """Monotonic counters; read them directly, or :meth:`snapshot` for a plain dict.

    ``prefix_queries``: calls of ``get_computed_blocks`` with prefix caching on or off;
    ``prefix_hits``: queries that returned at least one block; ``query_tokens`` / ``hit_tokens``: prompt
    tokens asked about / served from the cache; ``evictions``: cached blocks whose content was dropped to
    reuse the block; ``cow_copies``: copy-on-write block copies queued; ``miss_reasons``: a
    :class:`MissReason` string per query that found nothing.
    """

    prefix_queries: int = 0
    prefix_hits: int = 0
    query_tokens: int = 0
    hit_tokens: int = 0
    evictions: int = 0
    cow_copies: int = 0
    miss_reasons: Counter = field(default_factory=Counter)

    @property
    def hit_rate(self) -> float:
        """Fraction of queried tokens served from the cache (0.0 before any query)."""
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0

    def snapshot(self) -> dict:
        """A plain-dict copy of the counters (``miss_reasons`` as a dict)."""
        return {
            "prefix_queries": self.prefix_queries,
            "prefix_hits": self.prefix_hits,
            "query_tokens": self.query_tokens,
            "hit_tokens": self.hit_tokens,
            "hit_rate": self.hit_rate,
            "evictions": self.evictions,
            "cow_copies": self.cow_copies,
            "miss_reasons": dict(self.miss_reasons),
        }

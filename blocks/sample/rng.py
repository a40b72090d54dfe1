"""A request's own random stream for the sampler: one 62-bit key per step.

``RequestRng`` wraps a seeded CPU ``torch.Generator`` and hands out keys one per step, drawing
them from the generator in blocks (one ``torch.randint`` per ``block`` steps keeps the per-step host
cost near zero). The keys a request receives depend only on its seed and on how many steps it has
sampled, never on the batch around it; keep the object across preemption (``SamplingBatch.remove_request``
returns it, ``add_request(rng=...)`` takes it back) and the stream continues where it stopped.
"""

from __future__ import annotations

import torch

__all__ = ["RequestRng", "KEY_RANGE"]

KEY_RANGE = 2**62


class RequestRng:
    """Per-request key stream.

    Args:
        seed: the request's seed (``SamplingParams.seed``).
        block: keys drawn from the generator at a time (>= 1).
    """

    def __init__(self, seed: int, *, block: int = 64) -> None:
        if not isinstance(block, int) or block < 1:
            raise ValueError(f"block must be a positive integer, got {block!r}.")
        self.generator = torch.Generator().manual_seed(seed)
        self.block = block
        self._keys: list[int] = []
        self._pos = 0
        self.num_drawn = 0

    def next_key(self) -> int:
        """The next key, in ``[0, 2**62)``."""
        if self._pos == len(self._keys):
            self._keys = torch.randint(0, KEY_RANGE, (self.block,), generator=self.generator).tolist()
            self._pos = 0
        key = self._keys[self._pos]
        self._pos += 1
        self.num_drawn += 1
        return key

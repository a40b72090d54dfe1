"""Parallel sampling (``n > 1``): one prefilled prompt forked into ``n`` independent sequences.

``fork_parallel`` turns a parent request into ``n`` child requests with ``n = 1`` each. Child ``i``
is named ``f"{i}_{parent_id}"`` (vLLM's convention) and gets its own random stream: when the
parent has a ``seed``, child ``i``'s seed is ``derive_seed(seed, i)`` (a SplitMix64 mix, so the
whole group is reproducible and no two children share a stream); otherwise children are unseeded
and draw from the sampler's generator, which gives each row its own key every step.

The KV plan is data: the engine prefills the prompt once for child 0 and then applies
``ParallelGroup.forks`` (``(child 0 id, child i id)``): child ``i`` shares child 0's prompt blocks
(reference counts incremented, copy-on-write of the partly filled last block).

``ParallelGroup`` collects the children's outputs and reports the parent finished when every child
finished, with outputs ordered by child index.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from blocks.sample.params import SamplingParams

__all__ = ["derive_seed", "ChildRequest", "ParallelGroup", "fork_parallel"]

_MASK64 = (1 << 64) - 1


def derive_seed(seed: int, index: int) -> int:
    """Seed of child ``index`` of a request seeded with ``seed``: a SplitMix64 mix of both, in ``[0, 2**63)``."""
    if index < 0:
        raise ValueError(f"index must be non-negative, got {index}.")
    z = (seed * 0x9E3779B97F4A7C15 + (index + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


@dataclass
class ChildRequest:
    """One of the ``n`` sequences: ``request_id`` (``f"{index}_{parent_id}"``), ``index`` and ``params`` (``n=1``)."""

    request_id: str
    index: int
    params: SamplingParams


@dataclass
class ParallelGroup:
    """Bookkeeping of a parent request and its children (see the module docstring)."""

    parent_id: str
    children: list[ChildRequest]
    outputs: dict[int, Any] = field(default_factory=dict)
    finished_children: set[int] = field(default_factory=set)

    @property
    def forks(self) -> list[tuple[str, str]]:
        """``(source, destination)`` request ids: child 0 (prefilled) shares its prompt with each other child."""
        first = self.children[0].request_id
        return [(first, c.request_id) for c in self.children[1:]]

    def index_of(self, child_id: str) -> int:
        """Child index of ``child_id`` (raises ``ValueError`` if it is not one of this group's)."""
        for c in self.children:
            if c.request_id == child_id:
                return c.index
        raise ValueError(f"{child_id!r} is not a child of {self.parent_id!r}.")

    def record(self, child_id: str, output: Any, *, finished: bool) -> None:
        """Store the latest ``output`` of a child and whether it finished."""
        i = self.index_of(child_id)
        self.outputs[i] = output
        if finished:
            self.finished_children.add(i)

    @property
    def finished(self) -> bool:
        """True once every child finished."""
        return len(self.finished_children) == len(self.children)

    def ordered_outputs(self) -> list[Any]:
        """The children's latest outputs in index order (children without output yet are skipped)."""
        return [self.outputs[i] for i in sorted(self.outputs)]


def fork_parallel(parent_id: str, params: SamplingParams) -> ParallelGroup:
    """Split a request with ``params.n`` sequences into ``n`` single-sequence children."""
    children = []
    for i in range(params.n):
        seed = None if params.seed is None else derive_seed(params.seed, i)
        children.append(ChildRequest(f"{i}_{parent_id}", i, params.clone(n=1, seed=seed)))
    return ParallelGroup(parent_id=parent_id, children=children)

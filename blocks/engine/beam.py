"""Beam search inside the engine loop.

Every live beam is a scheduler request; the runner returns the log-softmax row of each beam that
completed its tokens instead of sampling it. Once every live beam of a prompt has its row, the
beam-search block (:class:`blocks.sample.beam_search.BeamSearch`) decides the step, and we apply
its plan through the scheduler: beams without children are aborted (their blocks freed), extra
children are forked from their parent (``Scheduler.fork_request``: KV blocks shared, the partly
filled block copied on write), and each surviving beam's token is appended like a sampled token.
So the prompt's blocks are held once for all beams, and the whole search runs in the same steps
as other requests.

Outputs mirror vLLM's ``LLM.beam_search``: one :class:`BeamSearchOutput` per prompt whose
``sequences`` are the best ``beam_width`` hypotheses, best first, each with the full ``tokens``
(prompt + generated), ``cum_logprob`` and ``text``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from blocks.sample.beam_search import BeamSearch
from blocks.sample.params import BeamSearchParams

__all__ = ["BeamSearchOutput", "BeamSearchSequence", "BeamGroup"]


@dataclass
class BeamSearchSequence:
    """A finished hypothesis: ``tokens`` (prompt + generated), ``cum_logprob``, ``text`` and why it
    ended (``"stop"`` on EOS, ``"length"`` at ``max_tokens``)."""

    tokens: list[int]
    cum_logprob: float
    text: str | None = None
    finish_reason: str | None = None
    logprobs: list = field(default_factory=list)


@dataclass
class BeamSearchOutput:
    """Result of one prompt's beam search (``sequences`` best first)."""

    request_id: str
    sequences: list[BeamSearchSequence]
    finished: bool = True


class BeamGroup:
    """The live beams of one prompt and their scheduler request ids (one per KV slot)."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: BeamSearchParams,
                 eos_token_ids: list[int]) -> None:
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.search = BeamSearch(params, eos_token_ids=eos_token_ids)
        self._ids = itertools.count()
        self.slot_to_rid: dict[int, str] = {0: self.new_rid()}
        self.rows: dict[str, torch.Tensor] = {}

    def new_rid(self) -> str:
        return f"{self.request_id}#beam{next(self._ids)}"

    @property
    def live_rids(self) -> list[str]:
        return [self.slot_to_rid[b.slot] for b in self.search.running]

    def ready(self) -> bool:
        """True when every live beam has its log-softmax row for this step."""
        return all(r in self.rows for r in self.live_rids)

    def advance(self, scheduler, register) -> tuple[dict[str, int], list[str], bool]:
        """Run one beam step and apply its KV plan.

        Args:
            scheduler: the engine's scheduler (``abort_request``, ``fork_request``).
            register: ``f(new_request_id)`` called for each forked beam (the engine's bookkeeping).

        Returns:
            ``(tokens, freed, done)``: the token to append per beam request id, the beam request ids
            that ended (aborted), and whether the search is over.
        """
        live = self.live_rids
        logprobs = torch.stack([self.rows.pop(r) for r in live])
        out = self.search.step(logprobs)
        freed = []
        for slot in out.freed_slots:
            rid = self.slot_to_rid.pop(slot)
            scheduler.abort_request(rid)
            freed.append(rid)
        if out.done:
            freed.extend(self.abort_all(scheduler))
            return {}, freed, True
        for src, dst in out.forks:  # before any token is appended: the child starts from the parent's state
            child = self.new_rid()
            scheduler.fork_request(self.slot_to_rid[src], child)
            self.slot_to_rid[dst] = child
            register(child)
        tokens = {self.slot_to_rid[slot]: tok for slot, tok in zip(out.slots, out.token_ids)}
        return tokens, freed, False

    def abort_all(self, scheduler) -> list[str]:
        rids = list(self.slot_to_rid.values())
        for rid in rids:
            scheduler.abort_request(rid)
        self.slot_to_rid.clear()
        self.rows.clear()
        return rids

    def output(self, tokenizer) -> BeamSearchOutput:
        seqs = []
        for hyp in self.search.best():
            tokens = self.prompt_token_ids + list(hyp.token_ids)
            text = tokenizer.decode(tokens, skip_special_tokens=True) if tokenizer is not None else None
            seqs.append(BeamSearchSequence(tokens, hyp.cum_logprob, text,
                                           finish_reason="stop" if hyp.finished_on_eos else "length"))
        return BeamSearchOutput(self.request_id, seqs)

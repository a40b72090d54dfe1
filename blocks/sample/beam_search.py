"""Beam search as a block: beam state, candidate expansion, HF scoring and the KV fork/free plan.

``BeamSearch`` holds the live beams of one prompt and the finished hypotheses. Each step the engine
runs the model on every live beam and hands ``step`` the next-token log-probabilities
``[num_beams, vocab]`` in ``running`` order; ``step`` returns a ``BeamStepOutput`` telling the engine
what to do with the KV cache, as data:

1. free the sequences in ``freed_slots`` (their beams have no surviving child);
2. for each ``(src_slot, dst_slot)`` in ``forks``: give ``dst_slot`` a copy of ``src_slot``'s block
   table (shared prefix blocks, reference counts incremented, copy-on-write of a partly filled last
   block when either appends);
3. append ``token_ids[i]`` to the sequence in ``slots[i]`` for every new running beam ``i``.

The first child of a parent keeps the parent's slot (no copy); other children take freed slots or
new ones. Slots are small integers (at most ``beam_width``).

Scoring follows transformers' beam search exactly: candidates are the top
``max(2, 1 + num_eos) * beam_width`` continuations of all beams by cumulative logprob; a candidate
ending in EOS (or reaching ``max_tokens``) that ranks among the first ``beam_width`` becomes a
finished hypothesis scored ``cum_logprob / generated_len ** length_penalty`` (``generated_len``
counts the EOS); the best ``beam_width`` non-finished candidates continue. ``early_stopping``:
``True`` stops once ``beam_width`` hypotheses are finished; ``False`` stops when the best running
beam, scored at the current length, cannot beat the worst kept hypothesis; ``"never"`` scores it at
``max_tokens`` when ``length_penalty > 0``.

Stochastic beams (``temperature > 0``, with optional ``top_k`` / ``top_p`` / ``min_p``): the
log-probabilities are divided by the temperature and filtered like the sampler's, and the
candidates are drawn without replacement from the softmax of the cumulative scores (Gumbel-top-k:
the exponential race keeping the best ``K``), then ranked by score, as transformers' beam sampling.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from blocks.sample.ops import NEG_INF, filter_threshold
from blocks.sample.params import BeamSearchParams

__all__ = ["BeamSearch", "BeamHypothesis", "BeamStepOutput", "Beam"]


@dataclass
class Beam:
    """A live beam: generated ``token_ids``, ``cum_logprob`` (sum of its chosen scores) and KV ``slot``."""

    token_ids: tuple[int, ...]
    cum_logprob: float
    slot: int


@dataclass
class BeamHypothesis:
    """A finished sequence: generated ``token_ids`` (EOS included when it ended on EOS),
    ``cum_logprob`` and ``score`` = ``cum_logprob / len(token_ids) ** length_penalty``."""

    token_ids: tuple[int, ...]
    cum_logprob: float
    score: float
    finished_on_eos: bool


@dataclass
class BeamStepOutput:
    """What one ``BeamSearch.step`` decided (see the module docstring for the order to apply it).

    ``parent_beams[i]``: index, in the previous ``running`` list, of new beam ``i``'s parent;
    ``token_ids[i]``: its new token; ``slots[i]``: its KV slot. ``freed_slots``, ``forks``
    (``(src_slot, dst_slot)``), ``finished``: hypotheses accepted this step; ``done``: the search is over.
    """

    parent_beams: list[int]
    token_ids: list[int]
    slots: list[int]
    freed_slots: list[int] = field(default_factory=list)
    forks: list[tuple[int, int]] = field(default_factory=list)
    finished: list[BeamHypothesis] = field(default_factory=list)
    done: bool = False


class BeamSearch:
    """Beam search over one prompt.

    Args:
        params: ``BeamSearchParams``.
        eos_token_ids: ids that end a hypothesis (ignored when ``params.ignore_eos``).
        generator: CPU generator for stochastic beams (default: seeded by ``params.seed``).
    """

    def __init__(
        self,
        params: BeamSearchParams,
        *,
        eos_token_ids: Sequence[int] = (),
        generator: torch.Generator | None = None,
    ) -> None:
        self.params = params
        self.eos_token_ids = frozenset(() if params.ignore_eos else eos_token_ids)
        self.running: list[Beam] = [Beam(token_ids=(), cum_logprob=0.0, slot=0)]
        self.finished: list[BeamHypothesis] = []
        self.num_generated = 0
        self.done = False
        self._improvable = True
        self._next_slot = 1
        if generator is None:
            generator = torch.Generator()
            if params.seed is None:
                generator.seed()
            else:
                generator.manual_seed(params.seed)
        self._generator = generator
        self._device_generators: dict[torch.device, torch.Generator] = {}

    @property
    def num_candidates(self) -> int:
        """How many continuations are ranked per step: ``max(2, 1 + num_eos) * beam_width``."""
        return max(2, 1 + len(self.eos_token_ids)) * self.params.beam_width

    def step(self, logprobs: torch.Tensor) -> BeamStepOutput:
        """Expand the live beams by one token.

        Args:
            logprobs: ``[len(running), vocab]`` float32 next-token log-probabilities of each live beam
                (``log_softmax`` of its logits), rows in ``running`` order.
        """
        if self.done:
            raise ValueError("the beam search is done; no more steps.")
        if logprobs.dim() != 2 or logprobs.shape[0] != len(self.running):
            raise ValueError(
                f"logprobs must have shape [num_beams={len(self.running)}, vocab], got {tuple(logprobs.shape)}."
            )
        p = self.params
        width = p.beam_width
        vocab = logprobs.shape[1]
        scores = self._warp(logprobs.float())
        cum = torch.tensor([b.cum_logprob for b in self.running], dtype=torch.float32, device=scores.device)
        flat = (scores + cum[:, None]).reshape(-1)
        k = min(self.num_candidates, int(torch.isfinite(flat).sum()))
        cand_scores, cand_idx = self._select(flat, k)
        cand_scores, cand_idx = cand_scores.tolist(), cand_idx.tolist()

        last_step = self.num_generated + 1 >= p.max_tokens
        new_beams: list[tuple[int, int, float]] = []  # (parent, token, cum)
        accepted: list[BeamHypothesis] = []
        gen_len = self.num_generated + 1
        can_add = self._improvable and not (p.early_stopping is True and len(self.finished) >= width)
        for rank, (score, idx) in enumerate(zip(cand_scores, cand_idx)):
            parent, token = divmod(idx, vocab)
            on_eos = token in self.eos_token_ids
            if on_eos or last_step:
                if rank < width and can_add:
                    tokens = self.running[parent].token_ids + (token,)
                    accepted.append(
                        BeamHypothesis(tokens, score, score / (gen_len**p.length_penalty), finished_on_eos=on_eos)
                    )
            elif len(new_beams) < width:
                new_beams.append((parent, token, score))
        self.finished = sorted(self.finished + accepted, key=lambda h: -h.score)[:width]
        accepted = [h for h in accepted if any(h is f for f in self.finished)]
        out = self._plan_slots(new_beams)
        out.finished = accepted
        self.num_generated = gen_len
        self._update_done(not new_beams)
        out.done = self.done
        return out

    def best(self, *, n: int | None = None) -> list[BeamHypothesis]:
        """The finished hypotheses, best first (``n`` of them, default ``beam_width``). When the search
        ended without enough finished ones, live beams fill in, scored at their current length."""
        n = self.params.beam_width if n is None else n
        hyps = list(self.finished)
        if len(hyps) < n:
            lp = self.params.length_penalty
            for b in self.running:
                if b.token_ids:
                    score = b.cum_logprob / len(b.token_ids) ** lp
                    hyps.append(BeamHypothesis(b.token_ids, b.cum_logprob, score, finished_on_eos=False))
        return sorted(hyps, key=lambda h: -h.score)[:n]

    # ------------------------------------------------------------------ internals
    def _warp(self, logprobs: torch.Tensor) -> torch.Tensor:
        p = self.params
        if not p.is_stochastic:
            return logprobs
        rows = logprobs.shape[0]
        full = lambda v, dt: torch.full((rows,), v, dtype=dt, device=logprobs.device)
        thr = filter_threshold(
            logprobs,
            full(p.temperature, torch.float32),
            full(p.top_k, torch.int64),
            full(p.top_p, torch.float32),
            full(p.min_p, torch.float32),
            rows_need_sort=p.top_k > 0 or p.top_p < 1.0,
        )
        return torch.where(logprobs >= thr[:, None], logprobs / p.temperature, NEG_INF)

    def _select(self, flat: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.params.is_stochastic:
            return flat.topk(k)
        gen = self._device_generators.get(flat.device)
        if gen is None:
            gen = self._device_generators[flat.device] = torch.Generator(device=flat.device)
        gen.manual_seed(int(torch.randint(0, 2**62, (1,), generator=self._generator)))
        noise = torch.empty_like(flat).exponential_(generator=gen)
        idx = (flat - noise.log()).topk(k).indices
        vals = flat[idx]
        order = vals.argsort(descending=True)
        return vals[order], idx[order]

    def _plan_slots(self, new_beams: list[tuple[int, int, float]]) -> BeamStepOutput:
        children: dict[int, list[int]] = {}
        for i, (parent, _, _) in enumerate(new_beams):
            children.setdefault(parent, []).append(i)
        freed = [b.slot for j, b in enumerate(self.running) if j not in children]
        pool = list(reversed(freed))
        slots = [0] * len(new_beams)
        forks: list[tuple[int, int]] = []
        for parent, kids in children.items():
            src = self.running[parent].slot
            slots[kids[0]] = src
            for kid in kids[1:]:
                if pool:
                    dst = pool.pop()
                else:
                    dst, self._next_slot = self._next_slot, self._next_slot + 1
                slots[kid] = dst
                forks.append((src, dst))
        self.running = [
            Beam(self.running[parent].token_ids + (token,), score, slots[i])
            for i, (parent, token, score) in enumerate(new_beams)
        ]
        return BeamStepOutput(
            parent_beams=[nb[0] for nb in new_beams],
            token_ids=[nb[1] for nb in new_beams],
            slots=slots,
            freed_slots=freed,
            forks=forks,
        )

    def _update_done(self, no_running: bool) -> None:
        p = self.params
        width = p.beam_width
        if no_running or self.num_generated >= p.max_tokens:
            self.done = True
            return
        if p.early_stopping == "never" and p.length_penalty > 0.0:
            best_len = p.max_tokens
        else:
            best_len = self.num_generated
        best_possible = self.running[0].cum_logprob / (best_len**p.length_penalty)
        worst_kept = min(h.score for h in self.finished) if len(self.finished) >= width else -1.0e9
        self._improvable = self._improvable and best_possible > worst_kept
        full = p.early_stopping is True and len(self.finished) >= width
        self.done = (not self._improvable) or full

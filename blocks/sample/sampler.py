"""The sampler: one pass from logits to the next token of every row of a ``SamplingBatch``.

Per step, in this order: min-tokens masking of stop/EOS ids, logit bias, allowed / banned tokens,
penalties (repetition, frequency, presence), temperature, top-k, top-p, min-p, then the
exponential race ``argmax(probs / E)``, ``E ~ Exp(1)``. Greedy rows (temperature 0) take the exact
argmax of the penalised logits.

Randomness: every random row draws one 62-bit key per step: a seeded request from its own
``RequestRng`` (a seeded CPU ``torch.Generator`` read in blocks), so it gives the same tokens
whatever else is in the batch; the others from the sampler's generator. The ``"torch"`` backend
draws the unseeded rows' noise with one ``exponential_`` and each seeded row's with a device
generator seeded by its key; the ``"triton"`` backend hashes the key, the round and the token id into the
noise inside the sampling kernel (no noise tensor). Both are reproducible per request; they do not produce
the same streams as each other (the Triton backend's top-p rows draw by inverse CDF from uniforms hashed the
same way). Drawing keys is host work only: the step has no host sync. On CUDA the Triton
kernels read the keys straight from pinned host slots (``KeyRing``: no copy). The Triton
backend samples without computing the top-p threshold (``triton_sample``: rejection, see its module; its
second kernel is launched only when some row is likely to need it, ``should_defer``);
thresholds are computed (``triton_thresholds``) only when processed logprobs or logits are asked for;
its penalties are applied by the sampling kernel itself (one kernel, ``triton_apply_penalties``, for an
all-greedy batch).

The backend is chosen once: ``"auto"`` = Triton for logits on a CUDA ``device`` (default: when CUDA is
available), torch elsewhere.

Example::

    sampler = Sampler(backend="auto")
    out = sampler(logits, batch)            # logits [batch.num_rows, vocab] float32
    out.sampled_token_ids                   # [num_rows] int64
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from blocks.sample.batch import BatchTensors, SamplingBatch
from blocks.sample.key_ring import KeyRing
from blocks.sample.logprobs import LogprobsTensors, compute_logprobs
from blocks.sample.ops import NEG_INF, apply_penalties, filter_threshold
from blocks.sample.rng import KEY_RANGE

__all__ = ["Sampler", "SamplerOutput", "SAMPLER_BACKENDS", "LOGPROBS_MODES"]

SAMPLER_BACKENDS = ("auto", "torch", "triton")
LOGPROBS_MODES = ("raw_logprobs", "processed_logprobs")


@dataclass
class SamplerOutput:
    """One step's result: ``sampled_token_ids`` ``[num_rows]`` int64 and, when any row asked for
    logprobs, ``logprobs`` with ``num_top`` = the largest ``logprobs`` requested in the batch
    (rows asking for fewer take a prefix)."""

    sampled_token_ids: torch.Tensor
    logprobs: LogprobsTensors | None = None
    sinks_written: bool = False  # the ids were also written to the call's ``id_sinks``


def _torch_argmax(x: torch.Tensor, sinks: tuple = ()) -> tuple[torch.Tensor, bool]:
    return x.argmax(dim=1), False


def _few_rows_argmax(argmax_rows, x: torch.Tensor, sinks: tuple = ()) -> tuple[torch.Tensor, bool]:
    """The Triton argmax for up to 64 rows, where torch's (one thread block a row) is slow: H100, 128256
    logits a row, 1 row 10.4 against 40.0 µs, 64 rows 21.6 against 48.5; at 256 rows (58.8 against 66.8 µs)
    its two Python launches would cost more host time than the GPU time they save. Returns ``(ids, whether
    sinks were written)``."""
    if x.shape[0] <= 64:
        return argmax_rows(x, sinks=sinks), bool(sinks)
    return x.argmax(dim=1), False


class Sampler:
    """Batched sampler over a ``SamplingBatch``.

    Args:
        backend: ``"torch"`` (sort-based reference, any device), ``"triton"`` (fused kernel) or
            ``"auto"`` (Triton for a CUDA ``device``, else torch).
        device: where the logits will live; ``None`` = CUDA if it is available (for ``"auto"`` only).
        logprobs_mode: ``"raw_logprobs"`` (vLLM's default: logprobs of the model's logits before any
            processing) or ``"processed_logprobs"`` (after penalties, temperature and filters).
        seed: seed of the generator used by unseeded rows (None = nondeterministic).
        triton_options: keyword arguments for ``triton_sample`` (``block``, ``num_pivots``,
            ``num_programs``, ``num_warps``, ``candidates``, ``max_rounds``); all but ``max_rounds`` also go
            to ``triton_thresholds``.
    """

    def __init__(
        self,
        *,
        backend: str = "auto",
        logprobs_mode: str = "raw_logprobs",
        seed: int | None = None,
        triton_options: dict | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if backend not in SAMPLER_BACKENDS:
            raise ValueError(f"backend must be one of {SAMPLER_BACKENDS}, got {backend!r}.")
        if logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got {logprobs_mode!r}.")
        if backend == "auto":
            on_cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
            backend = "triton" if on_cuda else "torch"
        self.backend = backend
        self.logprobs_mode = logprobs_mode
        self.triton_options = dict(triton_options or {})
        self._generator = torch.Generator()
        if seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(seed)
        self._device_generators: dict[torch.device, torch.Generator] = {}
        self._ring: KeyRing | None = None
        self._defer_for: object = None
        self._defer_value = True
        self._apply_penalties = apply_penalties
        self._argmax = _torch_argmax
        if backend == "triton":
            from blocks.sample.triton_argmax import argmax_rows
            from blocks.sample.triton_penalties import triton_apply_penalties
            from blocks.sample.triton_sample import should_defer, triton_sample
            from blocks.sample.triton_topk_topp import triton_thresholds

            self._triton_sample, self._triton_thresholds = triton_sample, triton_thresholds
            self._should_defer = should_defer
            self._apply_penalties = triton_apply_penalties
            self._argmax = functools.partial(_few_rows_argmax, argmax_rows)

    # ------------------------------------------------------------------ public
    def __call__(self, logits: torch.Tensor, batch: SamplingBatch, *, inplace: bool = False,
                 id_sinks: tuple[torch.Tensor, ...] = ()) -> SamplerOutput:
        """Sample one token per row.

        Args:
            logits: ``[batch.num_rows, vocab]`` float32 in ``batch.req_ids`` order, on ``batch.device``.
            batch: the sampling state (call ``batch.append_tokens`` with the result afterwards).
            inplace: allow the sampler to overwrite ``logits`` (saves a copy).
            id_sinks: up to two ``[num_rows]`` int64 tensors to receive the ids too, where the path can write
                them from its own kernel (the Triton argmax of an all-greedy batch); the output's
                ``sinks_written`` says whether it did (else copy them).
        """
        bt = self._check(logits, batch)
        want_lp = bt.max_num_logprobs >= 0
        raw = logits
        if not inplace or (want_lp and self.logprobs_mode == "raw_logprobs"):
            logits = logits.clone()
        # The Triton sampling kernel applies the penalties itself, in place, before reading each row.
        fused_penalties = self.backend == "triton" and bt.any_random and self._has_penalties(bt)
        x = self.process_logits(logits, bt, penalties=not fused_penalties)
        ring = self._key_ring(logits, bt.num_rows) if bt.any_random else None
        keys, seeded = self._row_keys(batch, None if ring is None else ring.acquire(bt.num_rows)) if bt.any_random \
            else (None, [])
        written = False
        if keys is None:  # an all-greedy batch: exact argmax (first index of the maximum), on either backend
            thr = None
            ids, written = self._argmax(x, tuple(id_sinks))
        elif self.backend == "triton":
            thr = None  # computed below only if processed logprobs need it
            dev_keys = keys if ring is not None else keys.to(x.device)  # pinned slots on CUDA
            pen = None
            if fused_penalties:
                pen = (bt.token_ids, bt.output_counts, bt.repetition_penalty, bt.frequency_penalty, bt.presence_penalty)
            opts = {"defer_rejections": self._defer(bt), **self.triton_options}
            try:
                ids = self._triton_sample(x, bt.temperature, bt.top_k, bt.top_p, bt.min_p, dev_keys, penalties=pen,
                                          **opts)
            finally:  # also after a refused launch: the next step must get its slot
                if ring is not None:
                    ring.release()
        else:
            thr, ids = self._torch_sample(x, bt, keys, seeded)
        lp = None
        if want_lp:
            if self.logprobs_mode == "raw_logprobs":
                source = raw
            else:
                if thr is None:  # greedy rows keep every token; others need their filter's threshold
                    thr = torch.full_like(bt.temperature, NEG_INF) if keys is None else self._threshold(x, bt)
                source = self._scaled(x, bt, thr)
            lp = compute_logprobs(source, ids, bt.max_num_logprobs)
        return SamplerOutput(sampled_token_ids=ids, logprobs=lp, sinks_written=written)

    def _defer(self, bt: BatchTensors) -> bool:
        """``triton_sample``'s ``defer_rejections`` for this batch (cached per membership: ``top_p_only`` is a new
        array at each upload)."""
        if bt.top_p_only is None:
            return True
        if bt.top_p_only is not self._defer_for:
            self._defer_for, self._defer_value = bt.top_p_only, self._should_defer(bt.top_p_only)
        return self._defer_value

    @staticmethod
    def _has_penalties(bt: BatchTensors) -> bool:
        return bt.any_penalty and bt.token_ids is not None and bt.output_counts is not None

    def process_logits(self, logits: torch.Tensor, bt: BatchTensors, *, penalties: bool = True) -> torch.Tensor:
        """Min-tokens masking, logit bias, allowed/banned tokens and (unless ``penalties=False``) penalties, in
        place on ``logits`` ``[num_rows, vocab]`` float32 (returned)."""
        x = logits
        if bt.min_tokens_rows is not None:
            x[bt.min_tokens_rows[:, None], bt.min_tokens_ids] = NEG_INF
        if bt.bias_ids is not None:
            x.scatter_add_(1, bt.bias_ids, bt.bias_values)
        if bt.banned is not None:
            x.masked_fill_(bt.banned, NEG_INF)
        if bt.dynamic_ban_rows is not None:
            x[bt.dynamic_ban_rows[:, None], bt.dynamic_ban_ids] = NEG_INF
        if penalties and self._has_penalties(bt):
            self._apply_penalties(
                x,
                bt.token_ids,
                bt.output_counts,
                repetition_penalty=bt.repetition_penalty,
                frequency_penalty=bt.frequency_penalty,
                presence_penalty=bt.presence_penalty,
            )
        return x

    def processed_logits(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """The distribution the sampler draws from, as logits ``[num_rows, vocab]`` float32 (new tensor):
        processed, divided by the temperature, filtered entries ``-inf``; greedy rows are processed only."""
        bt = self._check(logits, batch)
        x = self.process_logits(logits.clone(), bt)
        thr = self._threshold(x, bt)
        return self._scaled(x, bt, thr)

    # ------------------------------------------------------------------ internals
    def _check(self, logits: torch.Tensor, batch: SamplingBatch) -> BatchTensors:
        if logits.dim() != 2 or logits.shape != (batch.num_rows, batch.vocab_size):
            raise ValueError(
                f"logits must have shape [num_rows={batch.num_rows}, vocab={batch.vocab_size}], got "
                f"{tuple(logits.shape)}."
            )
        if logits.dtype != torch.float32:
            raise ValueError(f"logits must be float32, got {logits.dtype}.")
        return batch.prepare()

    def _threshold(self, x: torch.Tensor, bt: BatchTensors) -> torch.Tensor:
        if self.backend == "triton":
            opts = {k: v for k, v in self.triton_options.items() if k != "max_rounds"}
            return self._triton_thresholds(x, bt.temperature, bt.top_k, bt.top_p, bt.min_p, **opts)
        return filter_threshold(
            x, bt.temperature, bt.top_k, bt.top_p, bt.min_p, rows_need_sort=bt.any_top_k_or_p, sort_plan=bt.sort_plan
        )

    @staticmethod
    def _scaled(x: torch.Tensor, bt: BatchTensors, thr: torch.Tensor) -> torch.Tensor:
        greedy = (bt.temperature <= 0)[:, None]
        temp = torch.where(greedy, torch.ones_like(bt.temperature[:, None]), bt.temperature[:, None])
        scaled = torch.where(x >= thr[:, None], x / temp, NEG_INF)
        return torch.where(greedy, x, scaled)

    def _row_keys(self, batch: SamplingBatch, out: torch.Tensor | None = None) -> tuple[torch.Tensor, list[int]]:
        """One key per row for this step, ``[num_rows]`` int64 on the host (written into ``out`` when given),
        and the seeded rows.

        Seeded rows take the next key of their own ``RequestRng``, the others draw from the
        sampler's generator (host work only, no device sync)."""
        keys = torch.empty(batch.num_rows, dtype=torch.int64) if out is None else out
        keys.random_(0, KEY_RANGE, generator=self._generator)
        seeded = batch.seeded_rows
        if seeded:
            keys.numpy()[seeded] = [batch.rngs[r].next_key() for r in seeded]
        return keys, seeded

    def _key_ring(self, logits: torch.Tensor, num_rows: int) -> KeyRing | None:
        """The pinned slots the Triton kernels read keys from (CUDA only; grown to the batch)."""
        if self.backend != "triton" or not logits.is_cuda:
            return None
        if self._ring is None or self._ring.capacity < num_rows:
            if self._ring is not None:
                self._ring.wait_all()  # kernels may still read the old slots
            self._ring = KeyRing(max(num_rows, 256))
        return self._ring

    def _device_generator(self, device: torch.device) -> torch.Generator:
        gen = self._device_generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            self._device_generators[device] = gen
        return gen

    def _torch_sample(
        self, x: torch.Tensor, bt: BatchTensors, keys: torch.Tensor | None, seeded: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        greedy_ids = x.argmax(dim=1)
        if keys is None:
            return torch.full_like(bt.temperature, NEG_INF), greedy_ids
        thr = self._threshold(x, bt)
        temp = torch.where(bt.temperature > 0, bt.temperature, torch.ones_like(bt.temperature))
        scores = (x / temp[:, None]).masked_fill_(x < thr[:, None], NEG_INF)
        noise = torch.empty_like(scores)
        gen = self._device_generator(x.device)
        # Unseeded rows share one draw keyed by row 0's key (from the sampler's generator); seeded rows
        # then redraw their own row from their own key. ``keys`` is a host tensor: no device sync.
        host_keys = keys.tolist()
        gen.manual_seed(host_keys[0] ^ 0x5DEECE66D)
        noise.exponential_(generator=gen)
        for row in seeded:
            gen.manual_seed(host_keys[row])
            noise[row].exponential_(generator=gen)
        # The exponential race argmax(probs / noise) as argmax(scaled logits - log(noise)), in place.
        sampled = scores.sub_(noise.log_()).argmax(dim=1)
        return thr, torch.where(bt.temperature > 0, sampled, greedy_ids)

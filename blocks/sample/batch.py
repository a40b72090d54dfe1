"""Per-request sampling state of a running batch, built once and updated incrementally.

``SamplingBatch`` holds one row per running request: its parameters as tensors (temperature,
top-k, top-p, min-p, penalties), its prompt and generated token ids (for penalties), a count of
each generated token (frequency / presence penalty), its static allowed / banned-token mask, its
logit bias and its random stream (a ``RequestRng`` over a CPU ``torch.Generator`` for seeded requests).

Rows are dense ``0..num_rows-1``: ``add_request`` appends a row, ``remove_request`` moves the last
row into the hole (so the engine must build the logits in ``batch.req_ids`` order), and
``append_tokens`` records the tokens sampled this step.

Contract with the engine: every row samples at every sampler call. Add a request when it first
samples (its prompt fully prefilled, so chunked prefill never consumes its random stream) and
remove it when it finishes or is preempted; re-add a preempted request with its
``output_token_ids`` and the ``RequestRng`` that ``remove_request`` returned, and its seeded stream
continues exactly where it stopped. Parameter tensors are copied to the device
only when a request joined or left (``prepare``); per-step host work is O(rows), not O(tokens).

Example::

    batch = SamplingBatch(max_num_rows=8, vocab_size=32000, max_len=4096, device="cuda")
    batch.add_request("a", SamplingParams(temperature=0.7, top_p=0.9, seed=1), prompt_ids, eos_token_id=2)
    out = sampler(logits, batch)           # logits [batch.num_rows, vocab] in batch.req_ids order
    batch.append_tokens(out.sampled_token_ids, host_token_ids=out.sampled_token_ids.tolist())
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from blocks.sample.ops import SortPlan
from blocks.sample.params import SamplingParams, SamplingType
from blocks.sample.rng import RequestRng

__all__ = ["SamplingBatch", "BatchTensors"]


@dataclass
class BatchTensors:
    """Device views of the first ``num_rows`` rows, valid for one step (see ``SamplingBatch.prepare``).

    Scalars per row (``[num_rows]``): ``temperature`` f32 (0 = greedy), ``top_k`` i32 (0 = off),
    ``top_p`` f32, ``min_p`` f32, ``repetition_penalty`` / ``frequency_penalty`` / ``presence_penalty`` f32.
    ``token_ids`` ``[num_rows, max_len_in_batch]`` i64 (prompt + output, padded by repeating the
    row's first token) and ``output_counts`` ``[num_rows, vocab]`` i32 when some row has penalties.
    ``banned`` ``[num_rows, vocab]`` bool when some row restricts tokens. ``bias_ids`` / ``bias_values``
    ``[num_rows, max_bias]`` when some row has a logit bias. ``min_tokens_rows`` / ``min_tokens_ids``:
    rows still under ``min_tokens`` and the stop ids to mask there (padded by repetition).
    ``dynamic_ban_rows`` / ``dynamic_ban_ids``: multi-token bad words whose prefix just matched.
    Host flags: ``any_random``, ``any_penalty``, ``any_top_k_or_p``, ``max_num_logprobs`` (-1 = none),
    ``top_p_only`` (the ``top_p`` of the random rows without top-k, a host float32 array; ``None`` = unknown),
    and ``sort_plan`` (which rows the torch reference filter must ``topk`` or fully sort).
    """

    num_rows: int
    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    repetition_penalty: torch.Tensor
    frequency_penalty: torch.Tensor
    presence_penalty: torch.Tensor
    token_ids: torch.Tensor | None
    output_counts: torch.Tensor | None
    banned: torch.Tensor | None
    bias_ids: torch.Tensor | None
    bias_values: torch.Tensor | None
    min_tokens_rows: torch.Tensor | None
    min_tokens_ids: torch.Tensor | None
    dynamic_ban_rows: torch.Tensor | None
    dynamic_ban_ids: torch.Tensor | None
    any_random: bool
    any_penalty: bool
    any_top_k_or_p: bool
    max_num_logprobs: int
    sort_plan: SortPlan | None = None
    top_p_only: np.ndarray | None = None


_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty")


class SamplingBatch:
    """Sampling state of up to ``max_num_rows`` requests over a ``vocab_size`` vocabulary.

    Args:
        max_num_rows: capacity in requests. vocab_size: logits width.
        max_len: capacity in prompt + generated tokens per request (for penalties).
        device: where the per-step tensors live.
        max_num_logprobs: largest ``logprobs`` / ``prompt_logprobs`` a request may ask (vLLM: 20).
    """

    def __init__(
        self,
        *,
        max_num_rows: int,
        vocab_size: int,
        max_len: int,
        device: str | torch.device = "cpu",
        max_num_logprobs: int = 20,
    ) -> None:
        for name, value in (("max_num_rows", max_num_rows), ("vocab_size", vocab_size), ("max_len", max_len)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if not isinstance(max_num_logprobs, int) or max_num_logprobs < 0:
            raise ValueError(f"max_num_logprobs must be a non-negative integer, got {max_num_logprobs!r}.")
        self.max_num_rows, self.vocab_size, self.max_len = max_num_rows, vocab_size, max_len
        self.device = torch.device(device)
        self.max_num_logprobs = max_num_logprobs
        self.req_ids: list[str] = []
        self._row_of: dict[str, int] = {}
        self.params: list[SamplingParams] = []
        self.rngs: list[RequestRng | None] = []
        self._stop_ids: list[list[int]] = []
        self._bad_seqs: list[list[list[int]]] = []
        self._tails: list[list[int]] = []
        self.num_tokens = np.zeros(max_num_rows, dtype=np.int64)
        self.num_output = np.zeros(max_num_rows, dtype=np.int64)
        self._host = {f: np.zeros(max_num_rows, dtype=np.float32) for f in _FLOAT_FIELDS}
        self._host_top_k = np.zeros(max_num_rows, dtype=np.int32)
        self._dev: dict[str, torch.Tensor] = {}
        self._views: dict[str, torch.Tensor | None] | None = None  # prepare()'s views of the first rows
        self.seeded_rows: list[int] = []  # rows with their own RequestRng (refreshed by ``prepare``)
        self._min_token_candidates: list[int] = []
        self._bad_rows: list[int] = []
        self._any_penalty = self._any_random = self._any_top_k_or_p = self._any_banned = False
        self._top_p_only = np.zeros(0, dtype=np.float32)
        self._max_logprobs = -1
        self._sort_plan: SortPlan | None = None
        self._dirty = True
        self.token_ids = torch.zeros(max_num_rows, max_len, dtype=torch.int64, device=self.device)
        self.output_counts: torch.Tensor | None = None  # allocated when a row first needs penalties
        self.banned: torch.Tensor | None = None  # allocated when a row first restricts tokens
        self._bias_tensors: tuple[torch.Tensor, torch.Tensor] | None = None

    # ------------------------------------------------------------------ membership
    @property
    def num_rows(self) -> int:
        """Number of requests in the batch (rows ``0..num_rows-1``)."""
        return len(self.req_ids)

    def row_of(self, req_id: str) -> int:
        """Row index of ``req_id`` (raises ``KeyError`` if absent)."""
        return self._row_of[req_id]

    def add_request(
        self,
        req_id: str,
        params: SamplingParams,
        prompt_token_ids: Sequence[int],
        *,
        output_token_ids: Sequence[int] = (),
        eos_token_id: int | None = None,
        rng: RequestRng | None = None,
    ) -> int:
        """Append a row for ``req_id`` and return its index.

        ``output_token_ids`` lets a resumed (preempted) request keep its penalties and min-token count;
        ``rng`` lets it keep its random stream (``remove_request`` returns it). A seeded request
        without one gets ``RequestRng(params.seed)``.
        """
        if req_id in self._row_of:
            raise ValueError(f"request {req_id!r} is already in the sampling batch.")
        if self.num_rows >= self.max_num_rows:
            raise ValueError(f"the sampling batch is full (max_num_rows={self.max_num_rows}).")
        tokens = list(prompt_token_ids) + list(output_token_ids)
        if not prompt_token_ids:
            raise ValueError("prompt_token_ids must not be empty.")
        if len(tokens) > self.max_len:
            raise ValueError(f"prompt + output length must be at most max_len={self.max_len}, got {len(tokens)}.")
        if params.logprobs is not None and params.logprobs > self.max_num_logprobs:
            raise ValueError(f"logprobs must be at most max_logprobs={self.max_num_logprobs}, got {params.logprobs}.")
        bad = [t for t in tokens if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token ids must be in [0, {self.vocab_size}), got {bad[0]}.")
        restricted = (("logit_bias", params.logit_bias or ()), ("allowed_token_ids", params.allowed_token_ids or ()))
        for name, ids in restricted:
            oov = [t for t in ids if t >= self.vocab_size]
            if oov:
                raise ValueError(f"{name} token ids must be below vocab_size={self.vocab_size}, got {oov[0]}.")
        row = self.num_rows
        self.req_ids.append(req_id)
        self._row_of[req_id] = row
        self.params.append(params)
        if rng is None and params.sampling_type == SamplingType.RANDOM_SEED:
            rng = RequestRng(params.seed)
        self.rngs.append(rng)
        stops = set(params.stop_token_ids)
        if eos_token_id is not None and not params.ignore_eos:
            stops.add(eos_token_id)
        self._stop_ids.append(sorted(t for t in stops if t < self.vocab_size))
        seqs = params.bad_words_token_ids or []
        self._bad_seqs.append([s for s in seqs if len(s) > 1])
        self._tails.append(list(output_token_ids)[-max((len(s) for s in seqs), default=1) :])
        self.num_tokens[row] = len(tokens)
        self.num_output[row] = len(output_token_ids)
        for f in _FLOAT_FIELDS:
            self._host[f][row] = getattr(params, f)
        self._host_top_k[row] = params.top_k
        self.token_ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.int64).to(self.device)
        self.token_ids[row, len(tokens) :] = tokens[0]
        if self._has_penalty(params) and self.output_counts is None:
            self._allocate_counts(existing_rows=row)
        if self.output_counts is not None:
            self.output_counts[row].zero_()
            if output_token_ids:
                out = torch.tensor(list(output_token_ids), dtype=torch.int64, device=self.device)
                self.output_counts[row].scatter_add_(0, out, torch.ones_like(out, dtype=torch.int32))
        self._set_banned_row(row, params)
        self._dirty = True
        return row

    def remove_request(self, req_id: str) -> RequestRng | None:
        """Drop ``req_id``'s row (the last row moves into it) and return its random stream."""
        row = self._row_of.pop(req_id)
        last = self.num_rows - 1
        rng = self.rngs[row]
        if row != last:
            moved = self.req_ids[last]
            self._row_of[moved] = row
            for lst in (self.req_ids, self.params, self.rngs, self._stop_ids, self._bad_seqs, self._tails):
                lst[row] = lst[last]
            for arr in (self.num_tokens, self.num_output, self._host_top_k, *self._host.values()):
                arr[row] = arr[last]
            self.token_ids[row] = self.token_ids[last]
            if self.output_counts is not None:
                self.output_counts[row] = self.output_counts[last]
            if self.banned is not None:
                self.banned[row] = self.banned[last]
        for lst in (self.req_ids, self.params, self.rngs, self._stop_ids, self._bad_seqs, self._tails):
            lst.pop()
        self._dirty = True
        return rng

    # ------------------------------------------------------------------ per step
    def append_tokens(self, token_ids: torch.Tensor, *, host_token_ids: Sequence[int] | None = None) -> None:
        """Record one sampled token per row (``token_ids`` ``[num_rows]`` int64 on the batch device).

        Pass ``host_token_ids`` (the engine reads the sampled ids once per step anyway) when rows use
        multi-token ``bad_words``; otherwise they are read here with one host sync. The same as
        :meth:`record_tokens_on_device` followed by :meth:`record_tokens_on_host`.
        """
        self.record_tokens_on_device(token_ids)
        self.record_tokens_on_host(token_ids, host_token_ids)

    def record_tokens_on_device(self, token_ids: torch.Tensor) -> None:
        """The device half of :meth:`append_tokens`: the sampled ids ``[num_rows]`` into the token and count
        tensors (the penalties' inputs) and the rows' token counts, with no host sync, so the launches can be
        queued before the host reads the ids (an asynchronous engine reads them a step later).
        :meth:`record_tokens_on_host` must follow before the next :meth:`prepare` only when rows have
        multi-token ``bad_words`` (see :attr:`needs_host_tokens`)."""
        n = self.num_rows
        if token_ids.shape != (n,):
            raise ValueError(f"token_ids must have shape ({n},), got {tuple(token_ids.shape)}.")
        if n == 0:
            return
        if int(self.num_tokens[:n].max()) >= self.max_len:
            raise ValueError(f"a request exceeds max_len={self.max_len} tokens.")
        if self._any_penalty or self._dirty:  # only penalties read the token tensors (a row without one is
            # unaffected by stale contents: its penalty is neutral)
            ids = token_ids.to(device=self.device, dtype=torch.int64)[:, None]
            pos = torch.from_numpy(self.num_tokens[:n].copy()).to(self.device, non_blocking=True)[:, None]
            self.token_ids[:n].scatter_(1, pos, ids)
            if self.output_counts is not None:
                self.output_counts[:n].scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.int32))
        self.num_tokens[:n] += 1
        self.num_output[:n] += 1

    @property
    def needs_host_tokens(self) -> bool:
        """Whether the next :meth:`prepare` needs the last sampled ids on the host (multi-token ``bad_words``
        match against them)."""
        return bool([r for r in range(self.num_rows) if self._bad_seqs[r]] if self._dirty else self._bad_rows)

    def record_tokens_on_host(self, token_ids: torch.Tensor, host_token_ids: Sequence[int] | None = None) -> None:
        """The host half of :meth:`append_tokens`: the tails that multi-token ``bad_words`` match against
        (which read the ids: from ``host_token_ids`` if given, else with one sync)."""
        n = self.num_rows
        if n == 0:
            return
        bad_rows = [r for r in range(n) if self._bad_seqs[r]] if self._dirty else self._bad_rows
        if bad_rows:
            host = list(host_token_ids) if host_token_ids is not None else token_ids.tolist()
            for row in bad_rows:
                keep = max(len(s) for s in self._bad_seqs[row])
                self._tails[row] = (self._tails[row] + [int(host[row])])[-keep:]

    def prepare(self) -> BatchTensors:
        """Device tensors for this step (copies parameters only after membership changed)."""
        n = self.num_rows
        if self._dirty:
            self._upload()
        max_len_now = int(self.num_tokens[:n].max()) if n else 1
        any_penalty = self._any_penalty
        mt_rows, mt_ids = self._min_token_rows()
        db_rows, db_ids = self._dynamic_bans()
        bias = self._bias_tensors
        if self._views is None:  # the per-row views change only with membership (after an upload)
            d = self._dev
            self._views = {f: d[f][:n] for f in (*_FLOAT_FIELDS, "top_k")}
            self._views["output_counts"] = self.output_counts[:n] if self.output_counts is not None else None
            self._views["banned"] = self.banned[:n] if self.banned is not None else None
        v = self._views
        return BatchTensors(
            num_rows=n,
            temperature=v["temperature"],
            top_k=v["top_k"],
            top_p=v["top_p"],
            min_p=v["min_p"],
            repetition_penalty=v["repetition_penalty"],
            frequency_penalty=v["frequency_penalty"],
            presence_penalty=v["presence_penalty"],
            token_ids=self.token_ids[:n, :max_len_now] if any_penalty else None,
            output_counts=v["output_counts"] if any_penalty else None,
            banned=v["banned"] if self._any_banned else None,
            bias_ids=bias[0] if bias is not None else None,
            bias_values=bias[1] if bias is not None else None,
            min_tokens_rows=mt_rows,
            min_tokens_ids=mt_ids,
            dynamic_ban_rows=db_rows,
            dynamic_ban_ids=db_ids,
            any_random=self._any_random,
            any_penalty=any_penalty,
            any_top_k_or_p=self._any_top_k_or_p,
            top_p_only=self._top_p_only,
            max_num_logprobs=self._max_logprobs,
            sort_plan=self._sort_plan,
        )

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _has_penalty(p: SamplingParams) -> bool:
        return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0

    def _allocate_counts(self, *, existing_rows: int) -> None:
        """Allocate the output-count tensor and fill it for the rows already in the batch."""
        self.output_counts = torch.zeros(self.max_num_rows, self.vocab_size, dtype=torch.int32, device=self.device)
        for r in range(existing_rows):
            start, end = int(self.num_tokens[r] - self.num_output[r]), int(self.num_tokens[r])
            if end > start:
                out = self.token_ids[r, start:end]
                self.output_counts[r].scatter_add_(0, out, torch.ones_like(out, dtype=torch.int32))

    def _set_banned_row(self, row: int, params: SamplingParams) -> None:
        single = [s[0] for s in (params.bad_words_token_ids or []) if len(s) == 1]
        restricts = params.allowed_token_ids is not None or bool(single)
        if restricts and self.banned is None:
            self.banned = torch.zeros(self.max_num_rows, self.vocab_size, dtype=torch.bool, device=self.device)
        if self.banned is None:
            return
        self.banned[row].zero_()
        if params.allowed_token_ids is not None:
            allowed = [t for t in params.allowed_token_ids if t < self.vocab_size]
            if not allowed:
                raise ValueError(f"allowed_token_ids must contain ids below vocab_size={self.vocab_size}.")
            self.banned[row].fill_(True)
            self.banned[row, torch.tensor(allowed, dtype=torch.int64, device=self.device)] = False
        if single:
            ids = torch.tensor([t for t in single if t < self.vocab_size], dtype=torch.int64, device=self.device)
            self.banned[row, ids] = True

    def _upload(self) -> None:
        n = self.num_rows
        pin = self.device.type == "cuda"
        for f in _FLOAT_FIELDS:
            self._dev[f] = self._to_dev(self._host[f], pin)
        self._dev["top_k"] = self._to_dev(self._host_top_k, pin)
        self._any_random = any(p.sampling_type != SamplingType.GREEDY for p in self.params)
        self._any_penalty = any(self._has_penalty(p) for p in self.params)
        self.seeded_rows = [r for r, g in enumerate(self.rngs) if g is not None]
        self._min_token_candidates = [r for r, p in enumerate(self.params) if p.min_tokens > 0 and self._stop_ids[r]]
        self._bad_rows = [r for r, seqs in enumerate(self._bad_seqs) if seqs]
        random_rows = [r for r, p in enumerate(self.params) if p.sampling_type != SamplingType.GREEDY]
        k_rows = [r for r in random_rows if self.params[r].top_k > 0]
        p_rows = [r for r in random_rows if self.params[r].top_k == 0 and self.params[r].top_p < 1.0]
        as_dev = lambda rows: torch.tensor(rows, dtype=torch.int64).to(self.device) if rows else None  # noqa: E731
        self._sort_plan = SortPlan(
            top_k_rows=as_dev(k_rows),
            max_top_k=max((self.params[r].top_k for r in k_rows), default=1),
            full_sort_rows=as_dev(p_rows),
        )
        self._top_p_only = self._host["top_p"][p_rows]  # a new array each upload (callers may cache by identity)
        self._any_top_k_or_p = bool(n) and bool((self._host["top_p"][:n] < 1).any() or (self._host_top_k[:n] > 0).any())
        self._any_banned = self.banned is not None and any(
            p.allowed_token_ids is not None or any(len(s) == 1 for s in (p.bad_words_token_ids or []))
            for p in self.params
        )
        lps = [p.logprobs for p in self.params if p.logprobs is not None]
        self._max_logprobs = max(lps) if lps else -1
        biased = [(r, p.logit_bias) for r, p in enumerate(self.params) if p.logit_bias]
        self._bias_tensors = None
        if biased:
            width = max(len(b) for _, b in biased)
            ids = np.zeros((n, width), dtype=np.int64)
            vals = np.zeros((n, width), dtype=np.float32)
            for r, b in biased:
                items = [(t, v) for t, v in b.items() if t < self.vocab_size]
                for j, (t, v) in enumerate(items):
                    ids[r, j], vals[r, j] = t, v
            self._bias_tensors = (self._to_dev(ids, pin), self._to_dev(vals, pin))
        self._dirty = False
        self._views = None

    def _to_dev(self, arr: np.ndarray, pin: bool) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(arr))
        if pin:
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    def _padded(self, rows: list[int], lists: list[list[int]]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not rows:
            return None, None
        width = max(len(x) for x in lists)
        ids = np.array([x + [x[0]] * (width - len(x)) for x in lists], dtype=np.int64)
        return (
            torch.tensor(rows, dtype=torch.int64).to(self.device, non_blocking=True),
            torch.from_numpy(ids).to(self.device, non_blocking=True),
        )

    def _min_token_rows(self):
        rows, lists = [], []
        for r in self._min_token_candidates:
            if self.num_output[r] < self.params[r].min_tokens:
                rows.append(r)
                lists.append(self._stop_ids[r])
        return self._padded(rows, lists)

    def _dynamic_bans(self):
        rows, lists = [], []
        for r in self._bad_rows:
            seqs, tail = self._bad_seqs[r], self._tails[r]
            hits = [s[-1] for s in seqs if len(s) - 1 <= len(tail) and tail[len(tail) - len(s) + 1 :] == s[:-1]]
            hits = [t for t in hits if t < self.vocab_size]
            if hits:
                rows.append(r)
                lists.append(hits)
        return self._padded(rows, lists)

"""The model runner: turns a ``SchedulerOutput`` into tensors, runs the model, samples.

Per step (``execute``):

1. forget finished / preempted requests, create state for new ones, append new block ids;
2. build the flat inputs (decode rows first, then prefill chunks) and the attention plan;
3. apply copy-on-write block copies, run the forward, take logits only for rows that sample
   (the last token of a request whose known tokens are all computed) and for prompt logprobs;
4. sample all sampling rows in one pass and read the sampled ids back once.

The runner owns the KV cache tensor, the ``SamplingBatch`` and a :class:`~blocks.engine.request_table.RequestTable`
(per-request token ids, computed counts and persistent block-table rows).
Rows of the sampling batch are exactly this step's sampling requests: a request joins when its
prefill completes and leaves when it finishes, is preempted or is not scheduled (its random
stream is kept and handed back when it rejoins).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from blocks.attention.metadata import leading_decode_rows, metadata_from_tensors, plan_arrays
from blocks.cache.block_copy import block_copy
from blocks.cache.kv_tensors import allocate_kv_cache, layer_views
from blocks.engine.config import EngineConfig
from blocks.engine.cuda_graphs import DecodeGraphs
from blocks.engine.inflight import gather_inflight
from blocks.engine.kv_sizing import num_kv_blocks
from blocks.engine.pending import PendingStep, StepResult
from blocks.engine.request_table import RequestTable
from blocks.engine.shapes import MODEL_SHAPES, shape_config
from blocks.engine.staging import InputStager
from blocks.engine.step_inputs import StepInputs
from blocks.engine.tp_workers import TPWorkers
from blocks.layers.tp import TP_SINGLE, TPInfo
from blocks.models.base import CausalLM
from blocks.models.loader import load_model
from blocks.parallel.state import DistConfig, destroy_tensor_parallel, init_tensor_parallel
from blocks.sample.batch import RequestRng, SamplingBatch
from blocks.sample.logprobs import compute_logprobs
from blocks.sample.params import SamplingParams
from blocks.sample.sampler import Sampler
from blocks.sched.output import SchedulerOutput

__all__ = ["ModelRunner", "PendingStep", "StepResult", "SamplingInfo", "resolve_device"]


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available on this machine")
    return device


@dataclass
class SamplingInfo:
    """What the runner needs to know of a request to sample it."""

    params: SamplingParams
    num_prompt_tokens: int
    eos_token_id: int | None = None
    generator: RequestRng | None = None  # the random stream, kept across preemption
    beam: bool = False  # a beam-search sequence: return its log-softmax row instead of sampling


class ModelRunner:
    """Owns the model, the KV cache and the sampler (see module docstring).

    Args:
        config: the engine configuration.
        model_path: a local model folder (or hub id) for the loader.
        sampling_info: callback ``request_id -> SamplingInfo`` (the engine's request registry).
    """

    def __init__(self, config: EngineConfig, model_path: str,
                 sampling_info: Callable[[str], SamplingInfo] | None, *, tp: TPInfo | None = None) -> None:
        self.config = config
        self.workers: TPWorkers | None = None
        if tp is None and config.tensor_parallel_size > 1:  # rank 0: start ranks 1..N-1, then join them
            self.workers = TPWorkers(config, model_path, config.tensor_parallel_size)
            try:
                tp = init_tensor_parallel(config.tensor_parallel_size, config=DistConfig(
                    rank=0, world_size=config.tensor_parallel_size, master_port=self.workers.port))
            except BaseException:
                self.workers.shutdown()
                raise
        self.tp = tp or TP_SINGLE
        try:
            self._build(config, model_path, sampling_info)
        except BaseException:
            self.close()
            raise

    def _build(self, config: EngineConfig, model_path: str, sampling_info) -> None:
        self.device = resolve_device(config.device)
        if self.tp.size > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", self.tp.rank)
            torch.cuda.set_device(self.device)
        # gloo moves host tensors, NCCL device tensors
        self.comm_device = self.device if self.device.type == "cuda" else torch.device("cpu")
        trust_config = None
        if config.load_format == "dummy" and model_path.lower() in MODEL_SHAPES:
            trust_config = shape_config(model_path)  # a named shape: random weights, no files
        self.model: CausalLM = load_model(
            model_path, dtype=config.dtype, device=self.device, load_format=config.load_format,
            attn_backend=config.attention_backend, seed=config.seed or 0, trust_config=trust_config, tp=self.tp,
        )
        mc = self.model.config
        self.max_model_len = config.max_model_len or mc.max_position_embeddings
        if self.max_model_len > mc.max_position_embeddings:
            raise ValueError(
                f"max_model_len={self.max_model_len} exceeds the model's max_position_embeddings="
                f"{mc.max_position_embeddings}"
            )
        self.block_size = config.block_size
        self.kv_dtype = torch.float8_e4m3fn if config.kv_cache_dtype.startswith("fp8") else self.model.dtype
        self.num_blocks = self._num_kv_blocks()
        if self.workers is not None:  # before the collective below: the workers attach after it
            self.workers.open_channel(self.max_model_len)
        if self.tp.size > 1:  # every rank holds the same block ids: take the smallest budget
            n = torch.tensor([self.num_blocks], dtype=torch.int64, device=self.comm_device)
            dist.all_reduce(n, op=dist.ReduceOp.MIN)
            self.num_blocks = int(n.item())
        self.kv_cache = allocate_kv_cache(
            self.model.num_layers, self.num_blocks, self.block_size, self.model.num_kv_heads, self.model.head_dim,
            dtype=self.kv_dtype, device=self.device,
        )
        self.kv_caches = layer_views(self.kv_cache)
        self.stager = InputStager(self.device)
        self.sampler = Sampler(backend=config.sampler_backend, seed=config.seed, device=self.device)
        self.batch = SamplingBatch(
            max_num_rows=config.max_num_seqs, vocab_size=mc.vocab_size, max_len=self.max_model_len,
            device=self.device, max_num_logprobs=config.max_logprobs,
        )
        self.sampling_info = sampling_info
        self.requests = RequestTable(config.max_num_seqs, -(-self.max_model_len // self.block_size),
                                     on_leave=self._leave_batch)
        # the last step's sampled ids: on the device (read by the next step's in-flight rows) and pinned on
        # the host (two buffers: a step's copy may land while the host reads the step before)
        self.prev_ids = torch.zeros(config.max_num_seqs, dtype=torch.int64, device=self.device)
        pin = self.device.type == "cuda"
        self._host_ids = [torch.zeros(config.max_num_seqs, dtype=torch.int64, pin_memory=pin) for _ in range(2)]
        self._flip = 0
        self._inflight: dict[str, int] | None = None  # rid -> row of the last step launched with overlap
        self.graphs: DecodeGraphs | None = None
        if self.device.type == "cuda" and not config.enforce_eager:
            self.graphs = DecodeGraphs(self.model, self.kv_caches, block_size=self.block_size,
                                       max_batch=min(config.max_num_seqs, 512), max_model_len=self.max_model_len,
                                       prev_ids=self.prev_ids)
            self.graphs.capture()
        self.reset_counters()

    def close(self) -> None:
        """Stop tensor-parallel workers and leave the process group (no-op on one rank)."""
        if self.tp.size > 1:
            self.release_graphs()  # graphs hold captured collectives: drop them before the group goes
        if self.workers is not None:  # leaves the group together with the workers
            self.workers.shutdown()
            self.workers = None
        elif self.tp.size > 1:
            destroy_tensor_parallel()

    def release_graphs(self) -> None:
        """Drop the captured decode graphs (later steps run eagerly)."""
        graphs = getattr(self, "graphs", None)
        if graphs is not None:
            torch.cuda.synchronize(self.device)
            self.graphs = None

    def reset_counters(self) -> None:
        """Zero ``counters``: steps, tokens computed, KV tokens read (sum of context lengths), graph
        replays and host seconds (time the step spends in Python before the one sync)."""
        self.counters = {"steps": 0, "tokens": 0, "kv_tokens_read": 0, "graph_steps": 0, "host_s": 0.0}

    @property
    def host_time_per_step(self) -> float | None:
        steps = self.counters["steps"]
        return self.counters["host_s"] / steps if steps else None

    @property
    def bytes_per_token(self) -> int:
        """KV bytes of one token over all layers (K and V)."""
        return self.bytes_per_block // self.block_size

    # ------------------------------------------------------------------ sizing
    @property
    def bytes_per_block(self) -> int:
        m = self.model
        elem = torch.empty((), dtype=self.kv_dtype).element_size()
        return m.num_layers * 2 * self.block_size * m.num_kv_heads * m.head_dim * elem

    def _num_kv_blocks(self) -> int:
        return num_kv_blocks(self.model, self.config, max_model_len=self.max_model_len,
                             bytes_per_block=self.bytes_per_block, kv_dtype=self.kv_dtype, device=self.device)

    # ------------------------------------------------------------------ per step
    def _in_batch(self, rid: str) -> bool:
        try:
            self.batch.row_of(rid)
        except KeyError:
            return False
        return True

    def _leave_batch(self, rid: str, keep_stream: bool = True) -> None:
        """Drop ``rid``'s sampling row if it has one; with ``keep_stream`` its random stream goes back to its
        ``SamplingInfo`` (the one place the stream lives between rows: a preempted or paused request resumes it)."""
        if not self._in_batch(rid):
            return
        rng = self.batch.remove_request(rid)
        if keep_stream:
            with contextlib.suppress(KeyError):  # finished meanwhile: nobody resumes it
                self.sampling_info(rid).generator = rng

    def _sync_sampling_rows(self, sampling: list[str]) -> None:
        wanted = set(sampling)
        current = self.batch.req_ids
        if len(current) == len(wanted) and wanted.issuperset(current):
            return  # the same requests as last step (the steady decode state)
        for rid in list(current):
            if rid not in wanted:  # running but not sampling this step
                self._leave_batch(rid)
        for rid in sampling:
            if self._in_batch(rid):
                continue
            st = self.requests[rid]
            info = self.sampling_info(rid)
            self.batch.add_request(
                rid, info.params, st.token_ids[: st.num_prompt], output_token_ids=st.token_ids[st.num_prompt:],
                eos_token_id=info.eos_token_id, rng=info.generator,
            )

    def _copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        if pairs:
            block_copy(self.kv_cache, pairs)

    def execute(self, out: SchedulerOutput) -> StepResult:
        """Run one scheduled step and read its results (:meth:`launch`, then :meth:`PendingStep.resolve`)."""
        return self.launch(out).resolve()

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput, *, overlap: bool = False) -> PendingStep:
        """Queue one scheduled step on the device: inputs, forward, sampler, and the copy of the sampled ids
        to the host; returns a :class:`PendingStep` whose ``resolve`` waits for them. With ``overlap`` the
        caller will launch the next step before resolving this one: that step's decode rows whose input is
        this step's still-unread sample take it from the device (:mod:`blocks.engine.inflight`), so the ids
        are also kept on the device, and the requests they belong to are remembered."""
        step_start = time.perf_counter()
        self.requests.apply(out)
        if out.total_num_scheduled_tokens == 0:
            return PendingStep(self, None, StepResult({}, {}, {}, 0), step_start)
        num_sched = out.num_scheduled_tokens
        order = sorted(num_sched, key=lambda r: num_sched[r] != 1)  # decode rows first (stable)
        ids: list[int] = []
        positions: list[int] = []
        qlens, slens, rows = [], [], []
        sampling: list[str] = []
        beams: list[str] = []
        last_row: dict[str, int] = {}
        prompt_lp: list[tuple[str, int, int, int]] = []  # (rid, first row, first position, count)
        states = self.requests.states
        # rid -> row of the last step's sampled ids, if it was launched to overlap this one (when it was read
        # first after all, its tokens are known and no row below needs the map)
        inflight, self._inflight = self._inflight, None
        src: list[int] | None = None
        for rid in order:
            st = states[rid]
            tokens = st.token_ids
            known = len(tokens)
            n, start = num_sched[rid], st.num_computed
            end = start + n
            if end > known:
                if not (inflight and end == known + 1 and n == 1 and rid in inflight):
                    raise RuntimeError(f"request {rid}: scheduled past its known tokens ({end} > {known})")
                if src is None:
                    src = [-1] * len(ids)
                src.append(inflight[rid])
                known += 1
            elif src is not None:
                src.extend([-1] * n)
            row0 = len(ids)
            if n == 1:
                ids.append(tokens[start] if start < len(tokens) else 0)
                positions.append(start)
            else:
                ids.extend(tokens[start:end])
                positions.extend(range(start, end))
            qlens.append(n)
            slens.append(end)
            rows.append(st.row)
            info = st.info
            if info is None:
                info = st.info = self.sampling_info(rid)
            if end == known:
                (beams if info.beam else sampling).append(rid)
                last_row[rid] = row0 + n - 1
            if info.params.prompt_logprobs is not None and start < st.num_prompt - 1:
                count = min(end, st.num_prompt - 1) - start
                prompt_lp.append((rid, row0, start, count))
        self._sync_sampling_rows(sampling)
        sample_rows = [last_row[r] for r in self.batch.req_ids]
        beam_rows = [last_row[r] for r in beams]
        prompt_rows = [row0 + j for _, row0, _, count in prompt_lp for j in range(count)]
        graphs = self.graphs
        use_graph = bool(graphs is not None and len(ids) == len(order) and not prompt_lp
                         and graphs.bucket_for(len(ids)))
        width = -(-max(slens) // self.block_size)
        tables = self.requests.block_tables(rows, width)
        inputs = StepInputs(ids, positions, qlens, slens, tables, list(out.blocks_to_copy),
                            sample_rows + beam_rows + prompt_rows, use_graph)
        all_logits = self.run_model(inputs, src)
        ns, nb = len(sample_rows), len(beam_rows)
        prompt_result = self._prompt_logprobs(all_logits[ns + nb:], prompt_lp)
        beam_logprobs = dict(zip(beams, torch.log_softmax(all_logits[ns : ns + nb], dim=-1))) if beams else {}
        if not self.batch.req_ids:
            return PendingStep(self, None, StepResult({}, {}, prompt_result, len(ids), beam_logprobs), step_start)
        logits = all_logits[:ns]
        host = self._host_ids[self._flip][:ns]
        self._flip ^= 1
        # the host buffer and the next step's in-flight ids, written by the sampler's own kernel where it can
        sinks = (host, self.prev_ids[:ns]) if overlap else (host,)
        sampler_out = self.sampler(logits, self.batch, inplace=True, id_sinks=sinks)
        sampled_ids = sampler_out.sampled_token_ids
        self.batch.record_tokens_on_device(sampled_ids)  # queued behind the step, off the host's critical path
        if not sampler_out.sinks_written:
            host.copy_(sampled_ids, non_blocking=True)
        done = torch.cuda.Event() if self.device.type == "cuda" else None
        if done is not None:
            done.record()
        req_ids = list(self.batch.req_ids)
        launched = None
        if overlap:
            if not sampler_out.sinks_written:
                self.prev_ids[:ns].copy_(sampled_ids)  # where the next step's in-flight rows read their ids
            self._inflight = dict(zip(req_ids, range(ns)))
            launched = [states[r] for r in req_ids]  # identity: an id reused meanwhile must not take these tokens
        partial = StepResult({}, {}, prompt_result, len(ids), beam_logprobs)
        return PendingStep(self, (req_ids, launched, sampled_ids, host, done, sampler_out.logprobs), partial,
                           step_start, time.perf_counter())

    def run_model(self, inputs: StepInputs, src_rows: list[int] | None = None) -> torch.Tensor:
        """The forward of one step on this rank: block copies, the model (graph replay or eager) and the
        LM head on ``inputs.logits_rows``; returns ``[len(logits_rows), vocab]`` float32. Rank 0 of a
        tensor-parallel engine first sends ``inputs`` to the workers so every rank runs the same step.
        ``src_rows``: per token, the row of ``prev_ids`` holding its id (an in-flight token), or -1."""
        if self.workers is not None:
            if src_rows is not None:
                raise RuntimeError("in-flight input tokens need one rank (tensor parallelism runs synchronously)")
            self.workers.send(inputs)
        self._copy_blocks(inputs.copies)
        device = self.device
        if inputs.use_graph:  # one replay: the forward and the LM head on the wanted rows
            logits = self.graphs.run(inputs.token_ids, inputs.positions, inputs.seq_lens, inputs.block_tables,
                                     inputs.logits_rows, src_rows)
            self.counters["graph_steps"] += 1
            self._count(inputs)
            return logits
        qlens = np.asarray(inputs.query_lens)
        arrays = plan_arrays(qlens, np.asarray(inputs.seq_lens), np.asarray(inputs.block_tables), self.block_size)
        int64 = [np.asarray(inputs.token_ids, dtype=np.int64), np.asarray(inputs.positions, dtype=np.int64),
                 arrays["slot_mapping"], np.asarray(inputs.logits_rows, dtype=np.int64)]
        if src_rows is not None:
            int64.append(np.asarray(src_rows, dtype=np.int64))
        staged, (qsl, seq_lens, table) = self.stager.stage(
            int64, [arrays["query_start_loc"], arrays["seq_lens"], arrays["block_table"]])
        input_ids, pos, slots, rows = staged[:4]
        if src_rows is not None:
            gather_inflight(input_ids, staged[4], self.prev_ids)
        md = metadata_from_tensors(
            {"query_start_loc": qsl, "seq_lens": seq_lens, "block_table": table, "slot_mapping": slots},
            max_query_len=int(qlens.max()), max_seq_len=max(inputs.seq_lens),
            num_decode_tokens=leading_decode_rows(qlens), block_size=self.block_size)
        md = self.model.attn_backend.plan(md)
        hidden = self.model(input_ids, pos, self.kv_caches, md)
        self._count(inputs)
        if not inputs.logits_rows:
            return torch.empty(0, self.model.vocab_size, dtype=torch.float32, device=device)
        return self.model.compute_logits(hidden, rows)

    def _count(self, inputs: StepInputs) -> None:
        self.counters["steps"] += 1
        self.counters["tokens"] += len(inputs.token_ids)
        self.counters["kv_tokens_read"] += sum(inputs.seq_lens)

    def append_tokens(self, tokens: dict[str, int]) -> None:
        """Record tokens chosen outside the sampler (beam search) for requests the runner holds."""
        for rid, tok in tokens.items():
            st = self.requests.get(rid)
            if st is not None:
                st.token_ids.append(tok)

    def _prompt_logprobs(self, logits: torch.Tensor, spans: list[tuple[str, int, int, int]]):
        """Prompt logprobs of this step's prompt rows (``logits`` holds the spans' rows back to back)."""
        result = {}
        offset = 0
        for rid, _, start, count in spans:
            st = self.requests[rid]
            num = self.sampling_info(rid).params.prompt_logprobs
            rows = logits[offset : offset + count]
            offset += count
            targets = torch.tensor(st.token_ids[start + 1 : start + 1 + count], dtype=torch.int64, device=self.device)
            lp = compute_logprobs(rows, targets, num)
            entries = []
            for target, (value, rank, top) in zip(st.token_ids[start + 1 : start + 1 + count],
                                                  lp.to_host(list(range(count)), [num] * count)):
                top.setdefault(target, (value, rank))
                entries.append(top)
            result[rid] = entries
        return result

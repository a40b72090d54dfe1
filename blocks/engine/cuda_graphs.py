"""CUDA graphs for decode-only steps, one per batch-size bucket.

Eager PyTorch spends tens of microseconds of host time per kernel launch; an 8B decode step
launches hundreds of kernels, so without graphs the host, not the GPU, sets the pace. We capture
the model's forward for decode batches of each bucket size (1, 2, 4, 8, then multiples of 16) over
static input buffers, and replay the smallest bucket that fits, padding the extra rows:
``seq_lens = 0`` and ``slot_mapping = -1`` make the attention kernels skip them. The LM head is part
of the graph: a static ``logits_rows`` buffer says which rows' logits the step wants (in the
sampler's row order), so a decode step is one graph launch from input ids to float32 logits.

The attention plan of a captured graph is made for the worst case (``max_seq_len =
max_model_len``), so the kernel grid covers any context the step may have; kernels stop at each
row's real ``seq_lens``.

Graphs are captured in an L2 prefetch window (:mod:`blocks.layers.l2_prefetch`): where a layer's weights
after its attention fit L2 together, they stream into it while the attention runs.
"""

from __future__ import annotations

import numpy as np
import torch

from blocks.attention.metadata import AttentionMetadata
from blocks.engine.inflight import gather_inflight
from blocks.layers.l2_prefetch import prefetch_window

__all__ = ["DecodeGraphs", "graph_buckets", "fill_decode_inputs"]


def graph_buckets(max_batch: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, 8, 16, 32, 48, ... up to ``max_batch`` (always included)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16)) + [max_batch]
    return sorted(set(sizes))


def fill_decode_inputs(h64: np.ndarray, h32: np.ndarray, bs: int, width: int, block_size: int,
                       token_ids: list[int], positions: list[int], seq_lens: list[int], block_tables: np.ndarray,
                       logits_rows: list[int], src_rows: list[int] | None = None) -> None:
    """Write one decode step of ``n = len(token_ids)`` rows, padded to bucket ``bs``, into the host buffers.

    ``h64`` (``5 bs`` int64): ``[ids | positions | slots | logits rows | src]``; padding rows get id 0,
    position 0, slot -1 (no KV write) and logits row 0; ``src`` is ``src_rows`` (rows whose id is still on the
    device: :mod:`blocks.engine.inflight`), -1 elsewhere. ``h32`` (``bs * (width + 1)`` int32): ``[seq_lens | block
    table [bs, width]]``; padding rows get ``seq_len`` 0 (the kernels skip them). Table entries past a row's
    ``block_tables`` columns are left as they are: the kernels never read past ``seq_lens``.
    """
    n, m = len(token_ids), len(logits_rows)
    h64[:] = 0
    h64[:n] = token_ids
    pos = h64[bs : bs + n]
    pos[:] = positions
    slots = h64[2 * bs : 3 * bs]
    slots[n:] = -1
    slots[:n] = block_tables[np.arange(n), pos // block_size].astype(np.int64) * block_size + pos % block_size
    h64[3 * bs : 3 * bs + m] = logits_rows
    src = h64[4 * bs : 5 * bs]
    src[:] = -1
    if src_rows is not None:
        src[:n] = src_rows
    h32[:bs] = 0
    h32[:n] = seq_lens
    h32[bs:].reshape(bs, width)[:n, : block_tables.shape[1]] = block_tables


class DecodeGraphs:
    """Captured decode forwards (see module docstring).

    Args:
        model: the loaded model (its ``attn_backend`` must be graph-capturable: no host syncs).
        kv_caches: per-layer ``(key_cache, value_cache)`` views.
        block_size: tokens per KV block.
        max_batch: largest decode batch to capture.
        max_model_len: longest sequence; sets the block-table width and the plan's worst case.
    """

    def __init__(self, model, kv_caches, *, block_size: int, max_batch: int, max_model_len: int,
                 prev_ids: torch.Tensor | None = None) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.buckets = graph_buckets(max_batch)
        device = model.device
        self.width = -(-max_model_len // block_size)
        n = self.buckets[-1]
        # Per bucket b, one device buffer the graph reads: int64 [ids | positions | slots | logits rows | src]
        # (5 b) then int32 [seq_lens | block table] (b + b * width). A step fills the same layout at the front
        # of one pinned host buffer and copies it with a single transfer. ``prev_ids`` holds the last step's
        # sampled ids (the runner's), read where ``src >= 0`` (an asynchronous engine's in-flight tokens).
        self.prev_ids = prev_ids if prev_ids is not None else torch.zeros(n, dtype=torch.int64, device=device)
        self._host = torch.zeros(self._nbytes(n), dtype=torch.uint8, pin_memory=True)
        self._dev = {b: torch.zeros(self._nbytes(b), dtype=torch.uint8, device=device) for b in self.buckets}
        self._host_views = {b: tuple(t.numpy() for t in self._split(self._host[: self._nbytes(b)], b))
                            for b in self.buckets}
        self._query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self._copied = torch.cuda.Event()  # recorded after each step's transfers
        self._recorded = False
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def _nbytes(self, bs: int) -> int:
        return 8 * 5 * bs + 4 * bs * (self.width + 1)

    @staticmethod
    def _split(buf: torch.Tensor, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The int64 and int32 parts of a bucket's byte buffer (the int32 part starts 8-byte aligned)."""
        return buf[: 40 * bs].view(torch.int64), buf[40 * bs :].view(torch.int32)

    def _views(self, bs: int) -> dict[str, torch.Tensor]:
        d64, d32 = self._split(self._dev[bs], bs)
        return {"input_ids": d64[:bs], "positions": d64[bs : 2 * bs], "slot_mapping": d64[2 * bs : 3 * bs],
                "logits_rows": d64[3 * bs : 4 * bs], "src": d64[4 * bs :], "seq_lens": d32[:bs],
                "block_table": d32[bs:].view(bs, self.width)}

    def _metadata(self, bs: int) -> AttentionMetadata:
        v = self._views(bs)
        md = AttentionMetadata(
            query_start_loc=self._query_start_loc[: bs + 1], seq_lens=v["seq_lens"], block_table=v["block_table"],
            slot_mapping=v["slot_mapping"], max_query_len=1, max_seq_len=self.max_model_len, num_decode_tokens=bs,
            block_size=self.block_size,
        )
        return self.model.attn_backend.plan(md)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first (so smaller graphs reuse its memory pool)."""
        stream = torch.cuda.Stream(self.model.device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for bs in reversed(self.buckets):
                md = self._metadata(bs)
                v = self._views(bs)
                v["slot_mapping"].fill_(-1)
                v["src"].fill_(-1)
                args = (v["input_ids"], v["positions"], self.kv_caches, md)
                rows = v["logits_rows"]
                with prefetch_window(self.model.device):  # warm-up: compile kernels outside the capture
                    gather_inflight(v["input_ids"], v["src"], self.prev_ids)
                    self.model.compute_logits(self.model(*args), rows)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool, stream=stream), prefetch_window(self.model.device):
                    gather_inflight(v["input_ids"], v["src"], self.prev_ids)
                    out = self.model.compute_logits(self.model(*args), rows)
                if self.pool is None:
                    self.pool = graph.pool()
                self.graphs[bs] = (graph, out)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize(self.model.device)

    def bucket_for(self, num_seqs: int) -> int | None:
        """Smallest captured batch size ``>= num_seqs``, or None when the batch is too large."""
        for b in self.buckets:
            if b >= num_seqs:
                return b
        return None

    def run(self, token_ids: list[int], positions: list[int], seq_lens: list[int],
            block_tables: np.ndarray, logits_rows: list[int], src_rows: list[int] | None = None) -> torch.Tensor:
        """Replay the graph for a decode batch of ``n = len(token_ids)`` rows; returns float32 logits
        ``[len(logits_rows), vocab]`` of rows ``logits_rows`` (each ``< n``), a view valid until the next
        replay. Slots are derived from positions and block tables; ``src_rows`` (or None): per row, the row
        of ``prev_ids`` that holds its input id, or -1 (see :func:`fill_decode_inputs`)."""
        n = len(token_ids)
        bs = self.bucket_for(n)
        if self._recorded:  # the last step's transfer has left the pinned buffer
            self._copied.synchronize()
        h64, h32 = self._host_views[bs]
        fill_decode_inputs(h64, h32, bs, self.width, self.block_size, token_ids, positions, seq_lens,
                           block_tables, logits_rows, src_rows)
        dev = self._dev[bs]
        dev.copy_(self._host[: dev.numel()], non_blocking=True)
        self._copied.record()
        self._recorded = True
        graph, out = self.graphs[bs]
        graph.replay()
        return out[: len(logits_rows)]

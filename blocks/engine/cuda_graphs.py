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
"""

from __future__ import annotations

import numpy as np
import torch

from blocks.attention.metadata import AttentionMetadata

__all__ = ["DecodeGraphs", "graph_buckets"]


def graph_buckets(max_batch: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, 8, 16, 32, 48, ... up to ``max_batch`` (always included)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16)) + [max_batch]
    return sorted(set(sizes))


class DecodeGraphs:
    """Captured decode forwards (see module docstring).

    Args:
        model: the loaded model (its ``attn_backend`` must be graph-capturable: no host syncs).
        kv_caches: per-layer ``(key_cache, value_cache)`` views.
        block_size: tokens per KV block.
        max_batch: largest decode batch to capture.
        max_model_len: longest sequence; sets the block-table width and the plan's worst case.
    """

    def __init__(self, model, kv_caches, *, block_size: int, max_batch: int, max_model_len: int) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.buckets = graph_buckets(max_batch)
        device = model.device
        self.width = -(-max_model_len // block_size)
        n = self.buckets[-1]
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.block_table = torch.zeros(n, self.width, dtype=torch.int32, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.logits_rows = torch.zeros(n, dtype=torch.int64, device=device)
        pin = dict(pin_memory=True)
        self._host_ids = torch.empty(n, dtype=torch.int64, **pin)
        self._host_pos = torch.empty(n, dtype=torch.int64, **pin)
        self._host_slots = torch.empty(n, dtype=torch.int64, **pin)
        self._host_lens = torch.empty(n, dtype=torch.int32, **pin)
        self._host_table = torch.empty(n, self.width, dtype=torch.int32, **pin)
        self._host_rows = torch.empty(n, dtype=torch.int64, **pin)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def _metadata(self, bs: int) -> AttentionMetadata:
        md = AttentionMetadata(
            query_start_loc=self.query_start_loc[: bs + 1], seq_lens=self.seq_lens[:bs],
            block_table=self.block_table[:bs], slot_mapping=self.slot_mapping[:bs], max_query_len=1,
            max_seq_len=self.max_model_len, num_decode_tokens=bs, block_size=self.block_size,
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
                args = (self.input_ids[:bs], self.positions[:bs], self.kv_caches, md)
                rows = self.logits_rows[:bs]
                self.model.compute_logits(self.model(*args), rows)  # warm-up: compile kernels outside the capture
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool, stream=stream):
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
            block_tables: np.ndarray, logits_rows: list[int]) -> torch.Tensor:
        """Replay the graph for a decode batch of ``n = len(token_ids)`` rows; returns float32 logits
        ``[len(logits_rows), vocab]`` of rows ``logits_rows`` (each ``< n``), a view valid until the next
        replay. Slots are derived from positions and block tables."""
        n = len(token_ids)
        m = len(logits_rows)
        bs = self.bucket_for(n)
        bsz = self.block_size
        table = np.zeros((bs, self.width), dtype=np.int32)
        table[:n, : block_tables.shape[1]] = block_tables
        pos = np.asarray(positions, dtype=np.int64)
        slots = np.full(bs, -1, dtype=np.int64)
        slots[:n] = table[np.arange(n), pos // bsz].astype(np.int64) * bsz + pos % bsz
        lens = np.zeros(bs, dtype=np.int32)
        lens[:n] = seq_lens
        # stage in pinned memory, then one asynchronous copy per buffer (the previous step's sync on the
        # sampled ids guarantees the staging buffers are free again)
        self._host_ids[:n].copy_(torch.from_numpy(np.asarray(token_ids, dtype=np.int64)))
        self._host_pos[:n].copy_(torch.from_numpy(pos))
        self._host_slots[:bs].copy_(torch.from_numpy(slots))
        self._host_lens[:bs].copy_(torch.from_numpy(lens))
        self._host_table[:bs].copy_(torch.from_numpy(table))
        self._host_rows[:m].copy_(torch.from_numpy(np.asarray(logits_rows, dtype=np.int64)))
        self._host_rows[m:bs] = 0
        self.input_ids[:n].copy_(self._host_ids[:n], non_blocking=True)
        self.positions[:n].copy_(self._host_pos[:n], non_blocking=True)
        self.slot_mapping[:bs].copy_(self._host_slots[:bs], non_blocking=True)
        self.seq_lens[:bs].copy_(self._host_lens[:bs], non_blocking=True)
        self.block_table[:bs].copy_(self._host_table[:bs], non_blocking=True)
        self.logits_rows[:bs].copy_(self._host_rows[:bs], non_blocking=True)
        graph, out = self.graphs[bs]
        graph.replay()
        return out[:m]

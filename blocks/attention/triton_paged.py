"""Launching the Triton paged-attention kernels: the per-step plan and :func:`paged_attention`.

The plan (:class:`TritonPlan`) is built once per step from the metadata's host integers (never a
device read). It chooses, per layer shape, the tile sizes, whether to split the KV range
(flash-decoding) and into how many chunks, and owns the split workspace; every layer of the step
reuses the same :class:`LaunchConfig`. Nothing here syncs with the device, so a planned step can be
captured in a CUDA graph.

Kernel choice (host integers only):

* ``max_query_len <= 1`` (decode-only batch): one query token per program (``BLOCK_Q = 1``), the
  ``GROUP`` query heads of a KV head padded to a 16-row tile, against 128-key tiles in 2 stages (64 keys
  in 3 stages when shared memory is short, 32 for fp32 or head_dim > 128). When ``num_seqs * num_kv_heads``
  programs would not fill the multiprocessors twice, the KV range is split into ``num_splits`` chunks
  (merged by log-sum-exp): as many as fill them twice without starting a third wave, and enough to keep
  each chunk at most ``SPLIT_TOKENS`` keys (8 x 32768 on an H100, once a decode program's start-up was
  cheap: 8 splits 361-363 us, 16 splits 363-365 us, 33 splits 367 us; RESULTS.md), never below 256 keys a
  chunk; chunks of at most ``ONE_STAGE_MAX_KEYS`` keys run in one pipeline stage. The grid puts the KV head
  first, so the programs of one row's heads, which read the same cache blocks, start side by side. With at most
  ``WALK_MAX_SEQS`` rows and ``WALK_MIN_SEQ_LEN`` keys or more, the launch reads a *walk table*: each row's
  full blocks in ascending physical id, its last block kept last (:func:`physical_walk_table`, one small
  kernel a step, shared by the layers). A decode row's softmax does not depend on the order of its keys,
  and a program whose blocks are sorted changes 2 MB pages once per page instead of once per block (the
  cost that kept 8 x 32768 on shuffled blocks 1.5-2% behind SDPA; RESULTS.md). Not with a sliding
  window (its mask needs logical positions).
* a mixed batch whose first ``num_decode_tokens`` rows are decode rows (the engine's order): two
  launches, those rows as above (as a decode batch of that many sequences) and the prefill chunks as
  below; one 128-row tile per one-token row would cost 8x the tensor-core work of the 16-row tile.
* otherwise (prefill chunks, mixed batches): 128-row tiles of ``BLOCK_M // GROUP`` tokens times
  ``GROUP`` heads against 128-key tiles, 3 pipeline stages (64-row / 32-key / 2 stages for fp32 or
  head_dim > 128, for shared memory), no split.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field, replace

import torch
import triton

from blocks.attention.metadata import AttentionMetadata
from blocks.attention.triton_attention import merge_splits_kernel, paged_attn_kernel, walk_table_kernel
from blocks.attention.validation import check_attention
from blocks.triton_pdl import pdl_enabled, pdl_launch_kwargs

__all__ = ["Launch", "LaunchConfig", "TritonPlan", "WorkspacePool", "choose_config", "paged_attention",
           "physical_walk_table"]

MAX_SPLITS = 64
MIN_SPLIT_TOKENS = 256
# A split of at most this many keys (two 128-key tiles) runs in one stage: there is little to overlap, and the
# smaller shared-memory footprint fits three programs an SM instead of one. H100 (RESULTS.md): 1 x 4096 20.2 ->
# 18.7 us, 2 x 4096 28.0 -> 25.8 us; the decode graphs planned for 2048 tokens (8 splits of 256 keys) of
# Qwen2.5-0.5B 736 -> 724 us and Llama-3-8B 5277 -> 5240 us. Splits of about 1000 keys lost in one stage
# (4 x 8192: 76.4 -> 81.7 us). BLOCKS_ONE_STAGE_MAX_KEYS=0 turns it off.
ONE_STAGE_MAX_KEYS = int(os.environ.get("BLOCKS_ONE_STAGE_MAX_KEYS", "256"))
# Warps of a one-stage split. 8 warps (H100, RESULTS.md): 1 x 4096 19.7 -> 18.9 us and 1 x 1024 14.4 -> 13.4 us,
# but 1 x 2048 14.7 -> 15.5 us and the decode graphs planned for 2048 tokens 1-10 us a step slower.
ONE_STAGE_WARPS = 4
SPLIT_TOKENS = 4096
WALK_MIN_SEQ_LEN = 8192
WALK_CHUNK = 16  # walk-table entries a program places (H100 sweep: 16 x 256 keys, 2 warps; RESULTS.md)
WALK_MAX_SEQS = 16  # the walk is for few long rows (the split-KV regime); many rows fill the card without it
SORTED_WALK = os.environ.get("BLOCKS_SORTED_WALK", "1") != "0"
MAX_GRID_Y = 65535  # CUDA's limit on a grid's second axis


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes and split count for one layer shape (``BLOCK_*`` are Triton constexprs)."""

    block_q: int
    block_m: int
    block_n: int
    num_splits: int = 1
    num_warps: int = 4
    num_stages: int = 2
    sorted_walk: bool = False  # decode only: read blocks in physical order (see physical_walk_table)


@functools.lru_cache(maxsize=16)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # the interpreter: pretend an H100 so the heuristic takes the same branches


@functools.lru_cache(maxsize=16)
def _smem_per_block(device: torch.device) -> int:
    """Shared memory a program may use (opt-in maximum); the interpreter pretends an H100's."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", 227 * 1024))
    return 227 * 1024


def choose_config(
    *, num_seqs: int, max_query_len: int, max_seq_len: int, num_heads: int, num_kv_heads: int,
    head_dim: int, num_sms: int, dtype: torch.dtype, smem_per_block: int = 227 * 1024,
) -> LaunchConfig:
    """Pick tiles and the split count from host integers (see module docstring)."""
    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    d_pad = triton.next_power_of_2(head_dim)
    wide = dtype == torch.float32 or d_pad > 128
    if max_query_len <= 1:
        block_m = max(16, group_pad)
        # 128-key tiles, 2 stages where shared memory holds them (H100 sweep, RESULTS.md: 373 against 422 us
        # at 64 x 4096, 377 against 391 us at 256 x 1024); else 64 keys, 3 stages
        big = not wide and 2 * 128 * d_pad * 2 * dtype.itemsize <= smem_per_block
        block_n = 128 if big else 32 if wide else 64
        stages = 2 if big else 3
        programs = max(1, num_seqs * num_kv_heads)
        num_splits, warps = 1, 4
        if programs < 2 * num_sms:
            # fill the SMs twice over but not past it (rounding up started a third, mostly idle wave: 4 x 8192 on
            # an H100 took 77.7 us with 9 splits, 64.2 us with 8; RESULTS.md), with programs of at most SPLIT_TOKENS
            # keys
            num_splits = max((2 * num_sms) // programs, triton.cdiv(max_seq_len, SPLIT_TOKENS), 1)
            num_splits = max(1, min(num_splits, max_seq_len // MIN_SPLIT_TOKENS, MAX_SPLITS))
            if big and num_splits > 1 and triton.cdiv(max_seq_len, num_splits) <= ONE_STAGE_MAX_KEYS:
                stages, warps = 1, ONE_STAGE_WARPS
        return LaunchConfig(block_q=1, block_m=block_m, block_n=block_n, num_splits=num_splits,
                            num_warps=warps, num_stages=stages,
                            sorted_walk=SORTED_WALK and max_seq_len >= WALK_MIN_SEQ_LEN and num_seqs <= WALK_MAX_SEQS)
    block_m = max(64 if wide else 128, group_pad)
    block_q = max(1, block_m // group)
    if wide:
        return LaunchConfig(block_q=block_q, block_m=block_m, block_n=32, num_warps=4, num_stages=2)
    return LaunchConfig(block_q=block_q, block_m=block_m, block_n=128, num_warps=8, num_stages=3)


def physical_walk_table(block_table: torch.Tensor, seq_lens: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[num_seqs, width]`` int32: each row's blocks in the order a decode program should read them (the
    contract: :func:`blocks.attention.reference.physical_walk_table`), placing each full block by its rank
    among its row's full blocks (``walk_table_kernel``: ``O(blocks^2)`` compares a row, spread over many
    programs; torch's ``argsort`` took 57-92 us for 1-256 rows of 2048 on an H100, and a sort in registers
    45 us)."""
    num_seqs, width = block_table.shape
    out = torch.empty_like(block_table, dtype=torch.int32)  # entries past a row's last block: never read
    if num_seqs == 0 or width == 0:
        return out
    if block_table.stride(1) != 1:
        block_table = block_table.contiguous()
    pdl = pdl_enabled(block_table.device)
    walk_table_kernel[(triton.cdiv(width, WALK_CHUNK), num_seqs)](
        block_table, seq_lens, out, width, block_table.stride(0), out.stride(0), BLOCK_SIZE=block_size,
        CHUNK_I=WALK_CHUNK, CHUNK_J=256, PDL=pdl, num_warps=2, **pdl_launch_kwargs(pdl))
    return out


class WorkspacePool:
    """Float32 buffers for split-KV partial results that live as long as the pool (never freed).

    A CUDA graph captured with a split-KV launch keeps the workspace's address, so the memory must
    outlive every plan: the engine drops the metadata after capture. Buffers are keyed by device
    and a power-of-two size, so eager steps with varying token counts reuse a few buffers instead
    of allocating per step. Uses are sequential on one stream (write by the attention kernel, read
    by the merge kernel right after); give each concurrently running stream its own pool.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.device, int], torch.Tensor] = {}

    def get(self, num_splits: int, num_tokens: int, num_heads: int, head_dim: int, device: torch.device):
        """``(partial_out [S, T, H, D], partial_lse [S, T, H])`` float32 views of a pooled buffer."""
        n_out = num_splits * num_tokens * num_heads * head_dim
        n_lse = num_splits * num_tokens * num_heads
        size = triton.next_power_of_2(n_out + n_lse)
        key = (torch.device(device), size)
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = torch.empty(size, dtype=torch.float32, device=device)
        return (buf[:n_out].view(num_splits, num_tokens, num_heads, head_dim),
                buf[n_out:n_out + n_lse].view(num_splits, num_tokens, num_heads))


DEFAULT_WORKSPACE_POOL = WorkspacePool()


@dataclass(frozen=True)
class Launch:
    """One kernel launch of a layer: sequences ``[seq_start, seq_start + num_seqs)``, whose tokens are
    ``[tok_start, tok_end)`` (``tok_end`` of the last part includes padding tokens), with its config and
    split workspace (or ``None``)."""

    seq_start: int
    num_seqs: int
    tok_start: int
    tok_end: int
    config: LaunchConfig
    workspace: tuple | None
    one_token: bool = False  # every sequence of the part has exactly one query token (leading decode rows)


@dataclass
class TritonPlan:
    """Per-step plan: host integers of the batch plus the kernel launches of each layer shape.

    Attributes:
        num_seqs, num_tokens, max_query_len, max_seq_len, num_decode_tokens: copied from the metadata.
        overrides: fields forced on every chosen :class:`LaunchConfig` (tuning, tests).
        pool: where split workspaces come from (a backend passes its own; default: a process-wide pool).
        launches: ``(num_heads, num_kv_heads, head_dim, dtype, device, split_mixed) ->`` the layer's
            :class:`Launch` list (one, or two for a mixed batch); a launch's workspace is ``(partial_out
            [num_splits, tokens, num_heads, head_dim] float32, partial_lse [num_splits, tokens, num_heads]
            float32)`` or ``None``.
    """

    num_seqs: int
    num_tokens: int
    max_query_len: int
    max_seq_len: int
    num_decode_tokens: int = 0
    overrides: dict = field(default_factory=dict)
    pool: WorkspacePool = field(default=DEFAULT_WORKSPACE_POOL, repr=False)
    launches: dict = field(default_factory=dict)
    walk_table: torch.Tensor | None = field(default=None, repr=False)  # physical_walk_table, made on first use
    _walk_in_capture: bool = field(default=False, repr=False)

    @classmethod
    def from_metadata(cls, metadata: AttentionMetadata, *, pool: WorkspacePool | None = None,
                      **overrides) -> TritonPlan:
        return cls(metadata.num_seqs, metadata.num_tokens, metadata.max_query_len, metadata.max_seq_len,
                   metadata.num_decode_tokens, overrides=dict(overrides), pool=pool or DEFAULT_WORKSPACE_POOL)

    def walk_for(self, metadata: AttentionMetadata, block_size: int) -> torch.Tensor:
        """The step's :func:`physical_walk_table`, built by the first layer that asks and reused by the rest. A
        table made outside a CUDA-graph capture (the warm-up run before it) is made again inside it, so the
        graph rebuilds it on every replay, in the graph's own memory."""
        capturing = metadata.block_table.is_cuda and torch.cuda.is_current_stream_capturing()
        if self.walk_table is None or self._walk_in_capture != capturing:
            self.walk_table = physical_walk_table(metadata.block_table, metadata.seq_lens, block_size)
            self._walk_in_capture = capturing
        return self.walk_table

    def launches_for(self, query: torch.Tensor, num_kv_heads: int, *, split_mixed: bool = True) -> list[Launch]:
        """The (cached) kernel launches of this layer shape: one for the whole batch, or, for a mixed batch
        that starts with decode rows (``num_decode_tokens`` leading one-token rows) when ``split_mixed``,
        two: those rows with the decode tiles (16 rows, optional split-KV) and the prefill chunks with the
        wide tiles, which would otherwise spend a 128-row tile on each one-token row."""
        num_tokens, num_heads, head_dim = query.shape
        key = (num_heads, num_kv_heads, head_dim, query.dtype, query.device, split_mixed)
        hit = self.launches.get(key)
        if hit is not None:
            return hit
        d = self.num_decode_tokens
        # (first seq, seqs, first token, token end, max query len, every seq has one query token)
        if split_mixed and self.max_query_len > 1 and 0 < d < self.num_seqs:
            spans = ((0, d, 0, d, 1, True), (d, self.num_seqs - d, d, num_tokens, self.max_query_len, False))
        else:
            spans = ((0, self.num_seqs, 0, num_tokens, self.max_query_len, d >= self.num_seqs),)
        parts = []
        for seq_start, num_seqs, tok_start, tok_end, max_query_len, one_token in spans:
            cfg = choose_config(
                num_seqs=num_seqs, max_query_len=max_query_len, max_seq_len=self.max_seq_len,
                num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                num_sms=_num_sms(query.device), dtype=query.dtype, smem_per_block=_smem_per_block(query.device),
            )
            if self.overrides:
                cfg = replace(cfg, **self.overrides)
            workspace = None
            if cfg.num_splits > 1:  # rows indexed by token id: sized to the part's last token
                workspace = self.pool.get(cfg.num_splits, tok_end, num_heads, head_dim, query.device)
            parts.append(Launch(seq_start, num_seqs, tok_start, tok_end, cfg, workspace, one_token))
        self.launches[key] = parts
        return parts


def _alignment(*strides: int) -> int:
    """Largest power of two (<= 16) dividing every stride: row starts are that many elements aligned."""
    g = 0
    for s in strides:
        g = math.gcd(g, int(s))
    align = 1
    while align < 16 and g % (align * 2) == 0:
        align *= 2
    return align


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    metadata: AttentionMetadata,
    *,
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal paged attention of a mixed batch (Triton); same contract as the torch reference.

    Args:
        query: ``[num_tokens, num_heads, head_dim]`` fp16/bf16/fp32 (last dim contiguous).
        key_cache, value_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]`` in the query
            dtype or ``torch.float8_e4m3fn`` (then ``k_scale``/``v_scale`` float32 one-element tensors).
        metadata: the step's metadata; its ``plan`` is used if it is a :class:`TritonPlan`, else a
            plan is built here (and stored) from its host integers. On Hopper (PDL) its ``query_start_loc``
            and ``seq_lens`` are read while the kernel launched just before still runs, so that kernel
            must not write them (the engine's never do: they are step inputs).
        scale: softmax scale. sliding_window: keys with ``pos - p < W`` only. soft_cap: ``c*tanh(s/c)``.
        out: optional ``[num_tokens, num_heads, head_dim]`` output buffer (query dtype).

    Returns:
        ``[num_tokens, num_heads, head_dim]`` in ``query.dtype``; rows of padding tokens (beyond
        ``query_start_loc[-1]`` or of sequences with ``seq_len == 0``) are zero.

    Raises:
        ValueError: before any launch, on mismatched dtypes/shapes/devices, a cache whose rows are
            not ``[num_kv_heads, head_dim]``-contiguous, or a block table narrower than ``max_seq_len``.
    """
    fp8 = check_attention(query, key_cache, value_cache, metadata, sliding_window=sliding_window,
                          soft_cap=soft_cap, k_scale=k_scale, v_scale=v_scale, out=out)
    plan = metadata.plan
    if not isinstance(plan, TritonPlan):
        plan = metadata.plan = TritonPlan.from_metadata(metadata)
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[2]
    if out is None:
        out = torch.empty_like(query, memory_format=torch.contiguous_format)
    if num_tokens == 0:
        return out
    group = num_heads // num_kv_heads
    dummy = metadata.seq_lens
    use_window = sliding_window is not None and sliding_window > 0
    use_softcap = soft_cap is not None and soft_cap > 0
    align = _alignment(head_dim, *query.stride()[:2], *out.stride()[:2], *key_cache.stride()[:3],
                       *value_cache.stride()[:3])
    pdl = pdl_enabled(query.device)
    for part in plan.launches_for(query, num_kv_heads):
        cfg, workspace = part.config, part.workspace
        block_table = metadata.block_table
        if cfg.sorted_walk and (part.one_token or plan.max_query_len <= 1) and not use_window:
            block_table = plan.walk_for(metadata, key_cache.shape[1])
        part_tokens = part.tok_end - part.tok_start
        if cfg.block_q == 1:
            grid_q = part_tokens
        else:
            grid_q = part_tokens // cfg.block_q + part.num_seqs + 1
        split = cfg.num_splits > 1
        part_out, part_lse = workspace if split else (out, out)
        heads_fastest = cfg.block_q == 1 and grid_q <= MAX_GRID_Y
        grid = (num_kv_heads, grid_q, cfg.num_splits) if heads_fastest else (grid_q, num_kv_heads, cfg.num_splits)
        paged_attn_kernel[grid](
            query, key_cache, value_cache, out, part_out, part_lse,
            metadata.query_start_loc, metadata.seq_lens, block_table,
            k_scale if fp8 else dummy, v_scale if fp8 else dummy,
            float(scale), float(soft_cap) if use_softcap else 1.0, int(sliding_window) if use_window else 0,
            part.seq_start, part.num_seqs, part.tok_end, grid_q,
            query.stride(0), query.stride(1), out.stride(0), out.stride(1),
            key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
            value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
            block_table.stride(0),
            part_out.stride(0) if split else 0, part_out.stride(1) if split else 0,
            part_out.stride(2) if split else 0, part_lse.stride(0) if split else 0, part_lse.stride(1) if split else 0,
            GROUP=group, BLOCK_Q=cfg.block_q, ONE_TOKEN=part.one_token and cfg.block_q == 1, BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n,
            HEAD_DIM=head_dim, HEAD_DIM_PAD=triton.next_power_of_2(head_dim), BLOCK_SIZE=key_cache.shape[1],
            USE_SPLIT=split, USE_WINDOW=use_window, USE_SOFTCAP=use_softcap, KV_FP8=fp8,
            DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32", ALIGN=align, PDL=pdl,
            HEADS_FASTEST=heads_fastest,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_launch_kwargs(pdl),
        )
        if split:
            merge_splits_kernel[(part_tokens, num_heads)](
                part_out, part_lse, out, part.tok_start, cfg.num_splits,
                part_out.stride(0), part_out.stride(1), part_out.stride(2), part_lse.stride(0), part_lse.stride(1),
                out.stride(0), out.stride(1),
                # two variants only (a new power of two per step would mean a compile mid-run)
                SPLITS_PAD=8 if cfg.num_splits <= 8 else triton.next_power_of_2(max(cfg.num_splits, MAX_SPLITS)),
                HEAD_DIM=head_dim, HEAD_DIM_PAD=triton.next_power_of_2(head_dim), PDL=pdl, num_warps=4,
                **pdl_launch_kwargs(pdl),
            )
    return out


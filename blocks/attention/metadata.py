"""Attention metadata: the per-step description of a mixed batch that every layer reuses.

A step's batch is a list of sequences. Sequence ``i`` contributes ``query_len[i]`` new tokens
(1 for a decode row, many for a prefill chunk) that attend causally to its ``seq_lens[i]``
tokens of context (cached prefix plus the new tokens themselves). The new tokens of all
sequences are flattened into one ``[num_tokens, num_heads, head_dim]`` query tensor.

:func:`plan_attention` builds the tensors once per step from host-side lists; the plan is the
only place where Python touches per-sequence data. Kernels read only the tensors plus the host
integers (``max_query_len``, ``max_seq_len``, ``num_decode_tokens``) that pick a kernel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["AttentionMetadata", "leading_decode_rows", "plan_attention", "plan_attention_arrays", "plan_arrays",
           "metadata_from_tensors"]


@dataclass
class AttentionMetadata:
    """Tensors describing one step's batch (DESIGN.md section 3).

    Attributes:
        query_start_loc: ``[num_seqs + 1]`` int32. Tokens of sequence ``i`` are
            ``q[query_start_loc[i]:query_start_loc[i + 1]]``.
        seq_lens: ``[num_seqs]`` int32. Context length of sequence ``i`` after this step's
            tokens. A padding row has ``seq_lens == 0`` and no query tokens; kernels skip it.
        block_table: ``[num_seqs, max_blocks_per_seq]`` int32 physical block ids.
        slot_mapping: ``[num_tokens]`` int64, ``block_id * block_size + offset`` of each new
            token; ``-1`` marks a padding token whose K/V is not written.
        max_query_len: host int, longest query of the batch (kernel selection only).
        max_seq_len: host int, longest context of the batch (kernel selection only).
        num_decode_tokens: host int, number of *leading* rows with exactly one query token (the
            engine puts decode rows first; a kernel may give those rows their own launch).
        block_size: tokens per KV block.
        plan: backend-specific state built once per step by ``backend.plan(metadata)``
            (kernel choice, split count, workspace); ``None`` until planned.
    """

    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    max_query_len: int
    max_seq_len: int
    num_decode_tokens: int
    block_size: int
    plan: Any = field(default=None, repr=False)

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.slot_mapping.shape[0]

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> AttentionMetadata:
        """Return a copy with all tensors on ``device`` (the plan is dropped)."""
        return AttentionMetadata(
            query_start_loc=self.query_start_loc.to(device, non_blocking=non_blocking),
            seq_lens=self.seq_lens.to(device, non_blocking=non_blocking),
            block_table=self.block_table.to(device, non_blocking=non_blocking),
            slot_mapping=self.slot_mapping.to(device, non_blocking=non_blocking),
            max_query_len=self.max_query_len,
            max_seq_len=self.max_seq_len,
            num_decode_tokens=self.num_decode_tokens,
            block_size=self.block_size,
        )


def plan_attention(
    query_lens: Sequence[int],
    seq_lens: Sequence[int],
    block_tables: Sequence[Sequence[int]],
    block_size: int,
    *,
    device: torch.device | str = "cpu",
    max_blocks_per_seq: int | None = None,
) -> AttentionMetadata:
    """Build :class:`AttentionMetadata` for a batch from host-side per-sequence data.

    Args:
        query_lens: new tokens per sequence this step (``>= 0``; 0 makes a padding row).
        seq_lens: context length per sequence after this step (``>= query_lens[i]``).
        block_tables: physical block ids per sequence; must cover ``seq_lens[i]`` tokens.
        block_size: tokens per KV block.
        device: where the tensors go.
        max_blocks_per_seq: width of ``block_table`` (default: the widest table); rows are
            padded with block 0.

    Returns:
        The metadata; ``slot_mapping`` holds the slots of each sequence's last
        ``query_lens[i]`` positions, in batch order.
    """
    if not (len(query_lens) == len(seq_lens) == len(block_tables)):
        raise ValueError(
            f"query_lens ({len(query_lens)}), seq_lens ({len(seq_lens)}) and block_tables "
            f"({len(block_tables)}) must have one entry per sequence"
        )
    width = max((len(t) for t in block_tables), default=0)
    if max_blocks_per_seq is not None:
        if max_blocks_per_seq < width:
            raise ValueError(f"max_blocks_per_seq={max_blocks_per_seq} < widest block table {width}")
        width = max_blocks_per_seq
    table = np.zeros((len(block_tables), max(width, 1)), dtype=np.int32)
    for i, blocks in enumerate(block_tables):
        table[i, : len(blocks)] = blocks
    # a row shorter than the widest is padded with block 0: bound each sequence by its own table
    lens = np.array([len(t) for t in block_tables], dtype=np.int64)
    over = np.flatnonzero(np.asarray(seq_lens, dtype=np.int64) > lens * block_size) if block_size > 0 else []
    if len(over):
        i = int(over[0])
        raise ValueError(f"sequence {i}: block table of {lens[i]} blocks cannot hold seq_len {seq_lens[i]} "
                         f"(block_size={block_size})")
    return plan_attention_arrays(np.asarray(query_lens, dtype=np.int64), np.asarray(seq_lens, dtype=np.int64),
                                 table, block_size, device=device)


def plan_arrays(
    query_lens: np.ndarray,
    seq_lens: np.ndarray,
    block_table: np.ndarray,
    block_size: int,
) -> dict[str, np.ndarray]:
    """The metadata's arrays, on the host, for a batch held in arrays: ``query_start_loc`` (int32),
    ``seq_lens`` (int32), ``block_table`` (int32, ``[num_seqs, max(width, 1)]``) and ``slot_mapping``
    (int64). ``block_table [num_seqs, width]`` rows may be padded with any block id past each sequence's
    last block. Vectorized (no per-token Python); same checks as :func:`plan_attention`."""
    qlens = np.asarray(query_lens, dtype=np.int64)
    slens = np.asarray(seq_lens, dtype=np.int64)
    table = np.asarray(block_table)
    num_seqs = qlens.shape[0]
    if slens.shape != (num_seqs,) or table.ndim != 2 or table.shape[0] != num_seqs:
        raise ValueError(
            f"query_lens [{num_seqs}], seq_lens {list(slens.shape)} and block_table {list(table.shape)} must "
            f"describe the same sequences"
        )
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if num_seqs and ((qlens < 0).any() or (slens < qlens).any()):
        i = int(np.flatnonzero((qlens < 0) | (slens < qlens))[0])
        raise ValueError(f"sequence {i}: need 0 <= query_len ({qlens[i]}) <= seq_len ({slens[i]})")
    if num_seqs and (slens > table.shape[1] * block_size).any():
        i = int(np.flatnonzero(slens > table.shape[1] * block_size)[0])
        raise ValueError(f"sequence {i}: block table of {table.shape[1]} blocks cannot hold seq_len {slens[i]} "
                         f"(block_size={block_size})")
    starts = np.zeros(num_seqs + 1, dtype=np.int64)
    np.cumsum(qlens, out=starts[1:])
    num_tokens = int(starts[-1])
    seq_of_token = np.repeat(np.arange(num_seqs), qlens)
    pos = np.arange(num_tokens, dtype=np.int64) - starts[:-1][seq_of_token] + (slens - qlens)[seq_of_token]
    slots = table[seq_of_token, pos // block_size].astype(np.int64) * block_size + pos % block_size
    padded = np.zeros((num_seqs, max(table.shape[1], 1)), dtype=np.int32)
    padded[:, : table.shape[1]] = table
    return {"query_start_loc": starts.astype(np.int32), "seq_lens": slens.astype(np.int32),
            "block_table": padded, "slot_mapping": slots}


def metadata_from_tensors(tensors: dict[str, torch.Tensor], *, max_query_len: int, max_seq_len: int,
                          num_decode_tokens: int, block_size: int) -> AttentionMetadata:
    """Wrap the four tensors made from :func:`plan_arrays` (on any device) as metadata."""
    return AttentionMetadata(
        query_start_loc=tensors["query_start_loc"], seq_lens=tensors["seq_lens"], block_table=tensors["block_table"],
        slot_mapping=tensors["slot_mapping"], max_query_len=max_query_len, max_seq_len=max_seq_len,
        num_decode_tokens=num_decode_tokens, block_size=block_size,
    )


def plan_attention_arrays(
    query_lens: np.ndarray,
    seq_lens: np.ndarray,
    block_table: np.ndarray,
    block_size: int,
    *,
    device: torch.device | str = "cpu",
) -> AttentionMetadata:
    """:func:`plan_attention` for a batch already held in arrays (see :func:`plan_arrays`)."""
    arrays = plan_arrays(query_lens, seq_lens, block_table, block_size)
    tensors = {k: torch.from_numpy(v).to(device) for k, v in arrays.items()}
    qlens, slens = np.asarray(query_lens), arrays["seq_lens"]
    return metadata_from_tensors(tensors, max_query_len=int(qlens.max()) if qlens.size else 0,
                                 max_seq_len=int(slens.max()) if slens.size else 0,
                                 num_decode_tokens=leading_decode_rows(qlens), block_size=block_size)


def leading_decode_rows(query_lens) -> int:
    """How many rows at the front of the batch have exactly one query token (``num_decode_tokens``)."""
    qlens = np.asarray(query_lens)
    not_one = np.flatnonzero(qlens != 1)
    return int(not_one[0]) if not_one.size else int(qlens.size)

"""One step's model inputs as plain host data, and their encoding as two int64 tensors.

Rank 0 of a tensor-parallel engine builds :class:`StepInputs` from the scheduler output and
broadcasts them to the other ranks as tensors (never pickle): a fixed-size header, then one flat
payload. Every rank then runs the same forward on the same inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["StepInputs", "HEADER_SIZE", "CMD_STEP", "CMD_STOP"]

HEADER_SIZE = 8
CMD_STEP, CMD_STOP = 0, 1


@dataclass
class StepInputs:
    """The forward of one step.

    Attributes:
        token_ids, positions: ``[num_tokens]`` flattened tokens (decode rows first).
        query_lens, seq_lens: per sequence, new tokens and context length after the step.
        block_tables: ``[num_seqs, width]`` array of physical block ids; entries
            past a sequence's last block are ignored (``seq_lens`` bound the reads).
        copies: copy-on-write ``(src, dst)`` block pairs to apply before the forward.
        logits_rows: rows of the hidden states that need logits, in the order the caller wants them.
        use_graph: replay the decode CUDA graph (every rank must agree).
    """

    token_ids: list[int]
    positions: list[int]
    query_lens: list[int]
    seq_lens: list[int]
    block_tables: np.ndarray
    copies: list[tuple[int, int]] = field(default_factory=list)
    logits_rows: list[int] = field(default_factory=list)
    use_graph: bool = False

    def to_tensors(self, command: int = CMD_STEP) -> tuple[torch.Tensor, torch.Tensor]:
        """``(header [HEADER_SIZE], payload [n])`` int64 host tensors."""
        num_seqs = len(self.seq_lens)
        table = np.asarray(self.block_tables, dtype=np.int64)
        table = table.reshape(num_seqs, table.size // num_seqs if num_seqs else 0)
        width = table.shape[1]
        parts = [np.asarray(x, dtype=np.int64).ravel() for x in (
            self.token_ids, self.positions, self.query_lens, self.seq_lens, table,
            np.asarray(self.copies, dtype=np.int64).reshape(-1), self.logits_rows)]
        payload = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        header = np.array([len(self.token_ids), num_seqs, width, len(self.copies), len(self.logits_rows),
                           int(self.use_graph), command, payload.size], dtype=np.int64)
        return torch.from_numpy(header), torch.from_numpy(payload)

    @classmethod
    def from_tensors(cls, header: torch.Tensor, payload: torch.Tensor) -> StepInputs:
        """Inverse of :meth:`to_tensors` (``header`` and ``payload`` may live on any device)."""
        num_tokens, num_seqs, width, num_copies, num_rows, use_graph, _, _ = header.tolist()
        flat = payload.cpu().numpy()
        pos = 0

        def take(n: int) -> np.ndarray:
            nonlocal pos
            out = flat[pos : pos + n]
            pos += n
            return out

        ids, positions = take(num_tokens).tolist(), take(num_tokens).tolist()
        qlens, slens = take(num_seqs).tolist(), take(num_seqs).tolist()
        table = take(num_seqs * width).reshape(num_seqs, width)
        copies = [tuple(p) for p in take(2 * num_copies).reshape(num_copies, 2).tolist()]
        rows = take(num_rows).tolist()
        return cls(ids, positions, qlens, slens, table, copies, rows, bool(use_graph))

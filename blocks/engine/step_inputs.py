"""One step's model inputs as plain host data, and their encoding as two flat int64 arrays.

Rank 0 of a tensor-parallel engine builds :class:`StepInputs` from the scheduler output and sends them
to the other ranks (never pickle) as one message: a fixed-size int64 header, then one flat int64 payload
(:meth:`StepInputs.to_arrays`; :meth:`StepInputs.from_arrays` is the inverse, :func:`message_size` the
size of a message, used to size the shared-memory ring of :mod:`blocks.engine.shm_channel`). Every rank
then runs the same forward on the same inputs.

Header: ``[num_tokens, num_seqs, width, num_copies, num_rows, use_graph, command, payload_size]``.
Payload: token ids, positions (``num_tokens`` each), query lengths, sequence lengths (``num_seqs``
each), the block table row by row (``num_seqs * width``), the copies as ``src, dst`` pairs
(``2 * num_copies``), the logits rows (``num_rows``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["StepInputs", "HEADER_SIZE", "CMD_STEP", "CMD_STOP", "message_size"]

HEADER_SIZE = 8
CMD_STEP, CMD_STOP = 0, 1
H_COMMAND, H_PAYLOAD = 6, 7  # header indices of the command and the payload size


def _part_sizes(num_tokens: int, num_seqs: int, width: int, num_copies: int, num_rows: int) -> tuple[int, ...]:
    """Sizes of the payload's parts, in order (the one place that knows the layout)."""
    return num_tokens, num_tokens, num_seqs, num_seqs, num_seqs * width, 2 * num_copies, num_rows


def message_size(*, num_tokens: int, num_seqs: int, width: int, num_copies: int, num_rows: int) -> int:
    """int64 words of the message (header and payload) of a step of these sizes."""
    return HEADER_SIZE + sum(_part_sizes(num_tokens, num_seqs, width, num_copies, num_rows))


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

    @classmethod
    def empty(cls) -> StepInputs:
        """A step of nothing (the body of a command message such as ``CMD_STOP``)."""
        return cls([], [], [], [], np.zeros((0, 0), dtype=np.int64))

    def to_arrays(self, command: int = CMD_STEP) -> tuple[np.ndarray, np.ndarray]:
        """``(header [HEADER_SIZE], payload [n])`` int64 arrays (see the module docstring)."""
        num_seqs = len(self.seq_lens)
        table = np.asarray(self.block_tables, dtype=np.int64)
        width = table.size // num_seqs if num_seqs else 0
        copies = np.asarray(self.copies, dtype=np.int64).reshape(-1)
        sizes = _part_sizes(len(self.token_ids), num_seqs, width, len(self.copies), len(self.logits_rows))
        payload = np.empty(sum(sizes), dtype=np.int64)
        pos = 0
        for part, n in zip((self.token_ids, self.positions, self.query_lens, self.seq_lens, table.reshape(-1),
                            copies, self.logits_rows), sizes):
            payload[pos : pos + n] = part
            pos += n
        header = np.array([len(self.token_ids), num_seqs, width, len(self.copies), len(self.logits_rows),
                           int(self.use_graph), command, payload.size], dtype=np.int64)
        return header, payload

    @classmethod
    def from_arrays(cls, header: np.ndarray, payload: np.ndarray) -> StepInputs:
        """Inverse of :meth:`to_arrays`. ``block_tables`` is a view of ``payload`` (the caller owns it).

        Raises ValueError when the payload's size does not match the header."""
        num_tokens, num_seqs, width, num_copies, num_rows, use_graph, _, size = (int(x) for x in header)
        sizes = _part_sizes(num_tokens, num_seqs, width, num_copies, num_rows)
        if size != sum(sizes) or payload.size != size:
            raise ValueError(f"step inputs: header {list(map(int, header))} expects a payload of {sum(sizes)} "
                             f"words, got {payload.size}")
        parts, pos = [], 0
        for n in sizes:
            parts.append(payload[pos : pos + n])
            pos += n
        ids, positions, qlens, slens, table, copies, rows = parts
        return cls(ids.tolist(), positions.tolist(), qlens.tolist(), slens.tolist(), table.reshape(num_seqs, width),
                   [tuple(p) for p in copies.reshape(num_copies, 2).tolist()], rows.tolist(), bool(use_graph))

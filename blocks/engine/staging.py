"""Pinned host staging for a step's inputs: one host-to-device copy per dtype instead of one per tensor.

The runner packs the step's int64 arrays (token ids, positions, slots) and int32 arrays (query start
locations, sequence lengths, block table) into two pinned buffers and copies each with one
asynchronous transfer; the device tensors are views of the two copies, each starting on a 16-element
boundary. Before a buffer is refilled we
wait on the event recorded after its last copy, so a step that ends without a host sync (a prefill
chunk that samples nothing) can never overwrite bytes still in flight.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["InputStager", "ALIGN"]

ALIGN = 16  # elements: 64 bytes (int32) or 128 bytes (int64)


class _Buffer:
    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype, self.device = dtype, device
        self.host: torch.Tensor | None = None
        self.event: torch.cuda.Event | None = None

    def stage(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        sizes = [a.size for a in arrays]
        # every array starts ALIGN elements apart: a Triton kernel is specialized on whether its pointer
        # arguments are 16-byte aligned, and views at offsets that change with the batch size would
        # compile a new variant mid-run
        starts = np.zeros(len(arrays), dtype=np.int64)
        np.cumsum([-(-n // ALIGN) * ALIGN for n in sizes[:-1]], out=starts[1:])
        total = int(starts[-1]) + sizes[-1] if arrays else 0
        np_dtype = np.int64 if self.dtype == torch.int64 else np.int32
        if self.device.type != "cuda":
            flat = np.zeros(total, dtype=np_dtype)
        else:
            if self.event is not None:
                self.event.synchronize()
            if self.host is None or self.host.numel() < total:
                self.host = torch.empty(max(total, 1024) * 2, dtype=self.dtype, pin_memory=True)
            flat = self.host[:total].numpy()
        for a, start in zip(arrays, starts):
            flat[start:start + a.size] = a.ravel()  # the gaps between arrays are never read
        if self.device.type != "cuda":
            dev = torch.from_numpy(flat)
        else:
            dev = self.host[:total].to(self.device, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        return [dev[start:start + a.size].view(a.shape) for a, start in zip(arrays, starts.tolist())]


class InputStager:
    """Two pinned staging buffers (int64 and int32) for one device (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self._b64 = _Buffer(torch.int64, device)
        self._b32 = _Buffer(torch.int32, device)

    def stage(self, int64_arrays: list[np.ndarray], int32_arrays: list[np.ndarray]
              ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Device tensors with the arrays' shapes, in the given order."""
        return self._b64.stage(int64_arrays), self._b32.stage(int32_arrays)

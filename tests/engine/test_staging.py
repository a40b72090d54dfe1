"""Pinned input staging returns device tensors equal to the host arrays, shapes kept, across refills, each
starting on a 16-element boundary whatever the sizes (Triton specializes kernels on pointer alignment)."""

import numpy as np
import pytest
import torch

from blocks.engine.staging import ALIGN, InputStager


def _check(device):
    stager = InputStager(torch.device(device))
    rng = np.random.default_rng(0)
    for n in (5, 3000, 17, 1, 6):  # grows past the first buffer, then shrinks
        a64 = [rng.integers(-5, 1 << 40, size=n), rng.integers(0, 9, size=(n // 2 + 1,))]
        a32 = [rng.integers(0, 1 << 30, size=(3, n)).astype(np.int32), np.arange(n + 1, dtype=np.int32)]
        t64, t32 = stager.stage(a64, a32)
        for arr, t in zip(a64 + a32, t64 + t32):
            assert t.device.type == torch.device(device).type and tuple(t.shape) == arr.shape
            assert np.array_equal(t.cpu().numpy(), arr)
            assert t.storage_offset() % ALIGN == 0 and t.data_ptr() % 16 == 0


def test_staging_cpu():
    _check("cpu")


@pytest.mark.gpu
def test_staging_cuda():
    _check("cuda")

"""Shared test configuration: GPU tests skip cleanly without CUDA; seeds are fixed per test.

Without CUDA the Triton kernels (attention, KV write, block copy, sampler, fused layers, skinny GEMM) run
under the interpreter: ``TRITON_INTERPRET`` must be set before any ``@triton.jit`` function is defined,
i.e. before the kernel modules are imported, so it is set here, before any test module is collected.
"""

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Keep CPU tests deterministic and light on the 2-core CI machine.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# tiny tensors: one torch thread is several times faster than two on shared cores
_ONE_THREAD_DIRS = {"layers", "models"}


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_tensors(request):
    if Path(str(request.node.path)).parent.name not in _ONE_THREAD_DIRS:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

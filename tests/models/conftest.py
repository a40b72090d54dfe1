"""Model tests use tiny models: one torch thread is several times faster than two on shared cores.

Without CUDA the Triton attention backend runs under the interpreter; ``TRITON_INTERPRET`` must be
set before any ``@triton.jit`` function is defined, so it is set here, before test modules import.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

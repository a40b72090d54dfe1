"""Layer tests run tiny tensors: one torch thread is faster than two on the shared CI cores.

Without CUDA the fused Triton kernels run under the interpreter: ``TRITON_INTERPRET`` must be set
before their module is imported (the layers import it lazily, on first fused call).
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

"""The models run unchanged on every attention backend: Triton (interpreter on CPU, compiled on CUDA)
and, on a GPU, everything on the device."""

import pytest
import torch

from blocks.models.check import FAMILIES, check_family

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("family", ["llama3", "mistral"])  # GQA + llama3 rope; sliding window
def test_triton_backend_matches_transformers(family, tmp_path):
    result = check_family(family, workdir=tmp_path, max_new_tokens=4, prompt_lens=(1, 17, 33),
                          attn_backend="triton", device=DEVICE)
    assert result.passed, result


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_on_cuda(family, backend, tmp_path):
    result = check_family(family, workdir=tmp_path, max_new_tokens=32, attn_backend=backend, device="cuda")
    assert result.passed, result

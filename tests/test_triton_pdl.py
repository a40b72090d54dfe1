"""The programmatic-dependent-launch switch (blocks/triton_pdl.py): off wherever it cannot work."""

from __future__ import annotations

import pytest
import torch

from blocks.triton_pdl import pdl_enabled, pdl_launch_kwargs


@pytest.fixture(autouse=True)
def _fresh_cache():
    pdl_enabled.cache_clear()
    yield
    pdl_enabled.cache_clear()


def test_off_on_the_cpu_and_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("BLOCKS_PDL", "1")
    assert not pdl_enabled(torch.device("cpu"))
    assert pdl_launch_kwargs(pdl_enabled(torch.device("cpu"))) == {}
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not pdl_enabled(torch.device("cuda", 0))  # decided before any CUDA query


def test_environment_switch_turns_it_off(monkeypatch):
    monkeypatch.setenv("BLOCKS_PDL", "0")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not pdl_enabled(torch.device("cuda", 0))
    assert pdl_launch_kwargs(pdl_enabled(torch.device("cuda", 0))) == {}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the device machine)")
def test_on_for_hopper_gpus(monkeypatch):
    monkeypatch.delenv("BLOCKS_PDL", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    dev = torch.device("cuda", 0)
    hopper = torch.cuda.get_device_capability(dev)[0] >= 9
    assert pdl_enabled(dev) == hopper
    assert pdl_launch_kwargs(pdl_enabled(dev)) == ({"launch_pdl": True} if hopper else {})

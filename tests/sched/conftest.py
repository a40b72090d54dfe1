"""Scheduler test fixtures: the KV cache manager to test against."""

import importlib.util

import pytest

from tests.sched.fake_kv import FakeKVCacheManager


def real_kv_cls():
    if importlib.util.find_spec("blocks.cache.manager") is None:
        return None
    from blocks.cache.manager import KVCacheManager

    return KVCacheManager


KV_IMPLS = [pytest.param("real", id="real_kv"), pytest.param("fake", id="fake_kv")]


def make_kv(impl: str, num_blocks: int, block_size: int, **kw):
    if impl == "fake":
        return FakeKVCacheManager(num_blocks, block_size, **kw)
    cls = real_kv_cls()
    if cls is None:
        pytest.skip("blocks.cache.manager not available yet")
    return cls(num_blocks, block_size, **kw)


@pytest.fixture(params=["real", "fake"], ids=["real_kv", "fake_kv"])
def kv_impl(request):
    if request.param == "real" and real_kv_cls() is None:
        pytest.skip("blocks.cache.manager not available yet")
    return request.param

"""Paged KV cache: block pool, prefix cache, KV cache manager facade, KV tensors, block copy.

Host-side bookkeeping (``KVCacheManager``, ``BlockPool``) imports no torch; the tensor helpers
(``allocate_kv_cache``, ``layer_views``, ``block_copy``, ...) are loaded on first use.
"""

from .block_pool import BlockPool, FreeBlockQueue
from .manager import KVCacheManager
from .stats import CacheStats, MissReason

__all__ = ["KVCacheManager", "BlockPool", "FreeBlockQueue", "CacheStats", "MissReason",
           "allocate_kv_cache", "allocate_kv_cache_for_budget", "layer_views", "bytes_per_token", "bytes_per_block",
           "num_blocks_for_budget", "block_copy", "block_copy_reference", "plan_copy_waves"]

_LAZY = {name: "kv_tensors" for name in ("allocate_kv_cache", "allocate_kv_cache_for_budget", "layer_views",
                                         "bytes_per_token", "bytes_per_block", "num_blocks_for_budget")}
_LAZY.update({name: "block_copy" for name in ("block_copy", "block_copy_reference", "plan_copy_waves")})


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

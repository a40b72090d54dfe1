"""Chained block hashes for the prefix cache.

The hash of full block ``i`` of a request is ``H(hash_{i-1} || tokens_i [|| extra_keys if i == 0])`` with
``hash_{-1}`` empty, so equal hashes mean equal prefixes (up to collisions). Extra keys (cache salt, LoRA
adapter id, multimodal content hashes) enter the first block only: the chain carries them to every later
block. ``H`` is SHA-256 of a stable byte encoding (tokens as little-endian int64, extra keys as their
``repr``), so hashes are equal across processes and Python's hash seed.

Hashes only index the cache: :class:`~blocks.cache.block_pool.BlockPool` verifies the tokens and the
parent link of every hit, so even a broken ``hash_fn`` can only cost hits, never hand out wrong KV.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Sequence

__all__ = ["HashFn", "sha256_hash", "encode_extra_keys", "hash_block"]

HashFn = Callable[[bytes], bytes]

_ALLOWED_KEY_TYPES = (int, str, bytes, float, bool, type(None))
_PACKERS: dict[int, Callable[..., bytes]] = {}  # block length -> struct packer of that many int64


def sha256_hash(data: bytes) -> bytes:
    """The default block hash: SHA-256 digest (32 bytes) of ``data``."""
    return hashlib.sha256(data).digest()


def _check_key(key, field_name: str) -> None:
    if isinstance(key, tuple):
        for k in key:
            _check_key(k, field_name)
    elif not isinstance(key, _ALLOWED_KEY_TYPES):
        raise ValueError(
            f"{field_name} must hold only int, str, bytes, float, bool, None or tuples of them "
            f"(a stable encoding is needed); got {type(key).__name__}"
        )


def encode_extra_keys(extra_keys: tuple) -> bytes:
    """Stable bytes for ``extra_keys`` (a tuple of ints/strs/bytes/... ); ``b""`` for ``()``."""
    if not isinstance(extra_keys, tuple):
        raise ValueError(f"extra_keys must be a tuple, got {type(extra_keys).__name__}")
    if not extra_keys:
        return b""
    _check_key(extra_keys, "extra_keys")
    return b"\x00extra:" + repr(extra_keys).encode()


def hash_block(parent_hash: bytes, token_ids: Sequence[int], extra: bytes = b"", *,
               hash_fn: HashFn = sha256_hash) -> bytes:
    """Hash of one full block: ``hash_fn(parent_hash || int64 tokens || extra)``.

    ``parent_hash`` is ``b""`` for the first block; ``extra`` is :func:`encode_extra_keys` output for the
    first block and ``b""`` after it.
    """
    n = len(token_ids)
    pack = _PACKERS.get(n)
    if pack is None:
        pack = _PACKERS[n] = struct.Struct(f"<{n}q").pack
    try:
        payload = pack(*token_ids)
    except struct.error as e:
        raise ValueError(f"token_ids must be int64 integers: {e}") from None
    return hash_fn(parent_hash + payload + extra)

"""The Triton attention backend: plan once per step, then ``write_kv`` and ``attend`` per layer.

Usage::

    backend = get_attention_backend("triton")            # or "auto" on a CUDA device
    metadata = backend.plan(plan_attention(query_lens, seq_lens, block_tables, block_size, device="cuda"))
    for layer in layers:                                 # every layer reuses metadata.plan
        backend.write_kv(k, v, key_cache, value_cache, metadata)
        out = backend.attend(q, key_cache, value_cache, metadata, scale=head_dim ** -0.5)

Neither call syncs with the device, and the shapes are fixed by the metadata, so a planned step
can be captured in a CUDA graph (padding tokens have ``slot_mapping == -1`` and lie beyond
``query_start_loc[-1]`` or in rows with ``seq_len == 0``; the kernels skip them and write zeros).
A captured graph stays correct for any later ``seq_lens``/``block_table`` contents: the split count
is fixed at plan time, but each sequence's chunk is computed in the kernel from its ``seq_len``, and
the split workspace belongs to the backend (it outlives the captured metadata).
The kernels also run under ``TRITON_INTERPRET=1`` on CPU tensors (fp32/fp16).
"""

from __future__ import annotations

from blocks.attention.backend import AttentionBackend
from blocks.attention.metadata import AttentionMetadata
from blocks.attention.triton_cache_write import reshape_and_cache
from blocks.attention.triton_paged import TritonPlan, WorkspacePool, paged_attention

__all__ = ["TritonAttentionBackend"]


class TritonAttentionBackend(AttentionBackend):
    """Paged attention through the Triton kernels (see module docstring).

    Args:
        overrides: optional :class:`~blocks.attention.triton_paged.LaunchConfig` fields forced on
            every plan (``num_splits``, ``block_n``, ``num_warps``, ...), for tuning and tests.
    """

    name = "triton"

    def __init__(self, **overrides) -> None:
        self.overrides = overrides
        self.workspace = WorkspacePool()  # split-KV buffers; outlive every plan (CUDA graphs keep pointers)

    def plan(self, metadata: AttentionMetadata) -> AttentionMetadata:
        """Build the step's :class:`TritonPlan` from host integers into ``metadata.plan``."""
        metadata.plan = TritonPlan.from_metadata(metadata, pool=self.workspace, **self.overrides)
        return metadata

    def write_kv(self, key, value, key_cache, value_cache, metadata, *, k_scale=None, v_scale=None):
        """KV write by ``metadata.slot_mapping`` (see :func:`triton_cache_write.reshape_and_cache`)."""
        reshape_and_cache(key, value, key_cache, value_cache, metadata.slot_mapping, k_scale=k_scale, v_scale=v_scale)

    def attend(self, query, key_cache, value_cache, metadata, **kwargs):
        """Paged attention (see :func:`triton_paged.paged_attention`); plans lazily if needed."""
        if not isinstance(metadata.plan, TritonPlan):
            self.plan(metadata)
        return paged_attention(query, key_cache, value_cache, metadata, **kwargs)

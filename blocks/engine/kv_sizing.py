"""How many KV blocks the engine allocates.

On the CPU the budget is ``kv_cache_memory_bytes`` (default 1 GiB). On CUDA, unless
``kv_cache_memory_bytes`` is given, we run one forward of the largest step the scheduler can emit
(``max_num_batched_tokens`` tokens) and give the KV cache what is left of
``gpu_memory_utilization * total`` after that peak and the memory outside PyTorch. Either way the
count is capped at what ``max_num_seqs`` sequences of ``max_model_len`` tokens could use, and an engine
that cannot hold one full-length sequence fails at startup with the numbers and the fix.
"""

from __future__ import annotations

import torch

from blocks.attention.metadata import plan_attention
from blocks.cache.kv_tensors import allocate_kv_cache, layer_views
from blocks.engine.config import DEFAULT_CPU_KV_CACHE_BYTES, EngineConfig

__all__ = ["num_kv_blocks"]


def num_kv_blocks(model, config: EngineConfig, *, max_model_len: int, bytes_per_block: int,
                  kv_dtype: torch.dtype, device: torch.device) -> int:
    """Number of KV blocks (null block included) for ``model`` under ``config`` (see module docstring)."""
    block_size = config.block_size
    blocks_per_seq = -(-max_model_len // block_size)
    needed_max = config.max_num_seqs * blocks_per_seq + 1  # never more than every seq at full length
    budget = config.kv_cache_memory_bytes
    if budget is None:
        if device.type == "cuda":
            budget = _cuda_kv_budget(model, config, max_model_len=max_model_len, kv_dtype=kv_dtype, device=device)
        else:
            budget = DEFAULT_CPU_KV_CACHE_BYTES
    num_blocks = min(budget // bytes_per_block, needed_max)
    if num_blocks < blocks_per_seq + 1:
        need = (blocks_per_seq + 1) * bytes_per_block
        raise ValueError(
            f"the KV cache budget ({budget / 2**30:.2f} GiB) holds {num_blocks} blocks of {block_size} "
            f"tokens but one sequence of max_model_len={max_model_len} needs {blocks_per_seq + 1} "
            f"({need / 2**30:.2f} GiB): raise gpu_memory_utilization or kv_cache_memory_bytes, or lower "
            f"max_model_len"
        )
    return int(num_blocks)


def _cuda_kv_budget(model, config: EngineConfig, *, max_model_len: int, kv_dtype: torch.dtype,
                    device: torch.device) -> int:
    """Bytes left for the KV cache after a profiled max-size forward."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    _profile_forward(model, config, max_model_len=max_model_len, kv_dtype=kv_dtype, device=device)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    free, total = torch.cuda.mem_get_info(device)
    non_torch = (total - free) - torch.cuda.memory_reserved(device)
    budget = int(total * config.gpu_memory_utilization) - peak - max(non_torch, 0)
    torch.cuda.empty_cache()
    if budget <= 0:
        raise ValueError(
            f"no memory is left for the KV cache: the model and a max-size step peak at {peak / 2**30:.2f} GiB "
            f"of {total / 2**30:.2f} GiB with gpu_memory_utilization={config.gpu_memory_utilization}: "
            f"raise gpu_memory_utilization or lower max_num_batched_tokens / max_num_seqs"
        )
    return budget


@torch.inference_mode()
def _profile_forward(model, config: EngineConfig, *, max_model_len: int, kv_dtype: torch.dtype,
                     device: torch.device) -> None:
    block_size = config.block_size
    num_tokens = min(config.token_budget(max_model_len), max_model_len * config.max_num_seqs)
    seq = min(num_tokens, max_model_len)
    num_seqs = max(1, num_tokens // seq)
    blocks = -(-seq // block_size)
    kv = allocate_kv_cache(model.num_layers, num_seqs * blocks + 1, block_size, model.num_kv_heads, model.head_dim,
                           dtype=kv_dtype, device=device)
    tables = [list(range(1 + i * blocks, 1 + (i + 1) * blocks)) for i in range(num_seqs)]
    md = model.attn_backend.plan(plan_attention([seq] * num_seqs, [seq] * num_seqs, tables, block_size, device=device))
    ids = torch.zeros(seq * num_seqs, dtype=torch.int64, device=device)
    pos = torch.arange(seq, device=device).repeat(num_seqs)
    hidden = model(ids, pos, layer_views(kv), md)
    rows = torch.arange(min(config.max_num_seqs, hidden.shape[0]), device=device)
    model.compute_logits(hidden, rows)
    del kv, hidden

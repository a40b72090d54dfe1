"""blocks: a kernel-first LLM inference toolkit built from blocks that each stand alone.

Blocks: ``blocks.cache`` (paged KV allocator), ``blocks.attention`` (PagedAttention kernels and
their torch reference), ``blocks.layers``, ``blocks.parallel``, ``blocks.models``,
``blocks.sample``, ``blocks.sched`` and ``blocks.engine`` which assembles them.
"""

__version__ = "0.1.0"

_LAZY = {
    "LLM": "blocks.engine.llm",
    "SamplingParams": "blocks.sample.params",
    "BeamSearchParams": "blocks.sample.params",
    "RequestOutput": "blocks.engine.outputs",
    "CompletionOutput": "blocks.engine.outputs",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    """Import the public API lazily so ``import blocks`` stays light (no model code, no server)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'blocks' has no attribute {name!r}")

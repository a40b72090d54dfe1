"""blocks: a kernel-first LLM inference toolkit built from blocks that each stand alone.

Blocks: ``blocks.cache`` (paged KV allocator), ``blocks.attention`` (PagedAttention kernels and
their torch reference), ``blocks.layers``, ``blocks.parallel``, ``blocks.models``,
``blocks.sample``, ``blocks.sched`` and ``blocks.engine`` which assembles them.
"""

__version__ = "0.1.0"

"""Model families with exact transformers parity, their registry and the checkpoint loader.

* :func:`blocks.models.loader.load_model` builds a model from a Hugging Face folder or hub id
  (or dummy weights at real shapes); see its module docstring for the signature and errors.
* :class:`blocks.models.config.ModelConfig` is what the engine reads to size the KV cache
  (``num_layers``, ``num_kv_heads``, ``head_dim``, ``max_model_len``, ``vocab_size``).
* :mod:`blocks.models.base` states the forward contract (flattened ids/positions, per-layer KV
  cache views, attention metadata -> hidden states; ``compute_logits`` for selected rows).
* :mod:`blocks.models.llama` (Llama 2/3, Mistral, Qwen2/2.5, Qwen3) and :mod:`blocks.models.opt`.
* :mod:`blocks.models.harness` is a small greedy loop over the paged cache for tests and
  ``blocks check-models`` (:mod:`blocks.models.check`); the engine lives in ``blocks.engine``.

Submodules are imported on use so ``import blocks.models`` stays light.
"""

from __future__ import annotations

import importlib

__all__ = ["load_model", "ModelConfig", "supported_architectures"]

_LAZY = {
    "load_model": "blocks.models.loader",
    "ModelConfig": "blocks.models.config",
    "supported_architectures": "blocks.models.registry",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'blocks.models' has no attribute {name!r}")

"""Registry of supported architectures, keyed by ``config.json``'s ``architectures`` entry.

Families are imported lazily, only when their architecture is requested.
"""

from __future__ import annotations

import importlib

__all__ = ["MODEL_REGISTRY", "supported_architectures", "resolve_model_class"]

#: architecture name -> "module:ClassName"
MODEL_REGISTRY: dict[str, str] = {
    "LlamaForCausalLM": "blocks.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "blocks.models.llama:MistralForCausalLM",
    "Qwen2ForCausalLM": "blocks.models.llama:Qwen2ForCausalLM",
    "Qwen3ForCausalLM": "blocks.models.llama:Qwen3ForCausalLM",
    "OPTForCausalLM": "blocks.models.opt:OPTForCausalLM",
}


def supported_architectures() -> list[str]:
    """Sorted architecture names the loader can build."""
    return sorted(MODEL_REGISTRY)


def resolve_model_class(architectures: list[str] | str):
    """The model class of the first supported entry of ``architectures``.

    Raises:
        ValueError: none is supported; the message names them and lists the supported ones.
    """
    names = [architectures] if isinstance(architectures, str) else list(architectures or [])
    for name in names:
        if name in MODEL_REGISTRY:
            module, cls = MODEL_REGISTRY[name].split(":")
            return getattr(importlib.import_module(module), cls)
    raise ValueError(f"unsupported architecture {names!r}; supported architectures: "
                     f"{', '.join(supported_architectures())}")

"""Engine configuration: vLLM's constructor arguments, validated once.

``EngineConfig`` holds what ``LLM(...)`` and ``blocks serve`` accept, with vLLM's names and
defaults where they exist. Every invalid value raises ``ValueError`` naming the field and its limit.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

__all__ = ["EngineConfig", "KV_CACHE_DTYPES", "DEFAULT_CPU_KV_CACHE_BYTES"]

KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")
DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30  # 1 GiB on the CPU unless kv_cache_memory_bytes says otherwise
_BLOCK_SIZES = (1, 8, 16, 32, 64, 128)
_POLICIES = ("fcfs", "priority", "cache_aware")


@dataclass(kw_only=True)
class EngineConfig:
    """Everything the engine needs to start (see ``LLM`` for each field's meaning).

    ``model=None`` means the embedded default model. ``max_model_len=None`` takes the model's
    ``max_position_embeddings``. ``max_num_batched_tokens=None`` takes
    ``max(8192, max_model_len)`` with chunked prefill off, else 8192.
    """

    model: str | None = None
    tokenizer: str | None = None
    skip_tokenizer_init: bool = False
    dtype: str = "auto"
    tensor_parallel_size: int = 1
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_bytes: int | None = None
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    enable_chunked_prefill: bool = True
    long_prefill_token_threshold: int = 0
    enable_prefix_caching: bool = True
    kv_cache_dtype: str = "auto"
    enable_lora: bool = False
    load_format: str = "auto"
    seed: int | None = 0
    device: str = "auto"
    enforce_eager: bool = False
    attention_backend: str = "auto"
    sampler_backend: str = "auto"
    scheduling_policy: str = "fcfs"
    max_num_queued_requests: int | None = None
    max_logprobs: int = 20
    async_scheduling: bool | None = None
    hf_overrides: dict | None = None

    def __post_init__(self) -> None:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

        for name in ("tensor_parallel_size", "max_num_seqs"):
            positive(name)
        for name in ("max_model_len", "max_num_batched_tokens", "kv_cache_memory_bytes", "max_num_queued_requests"):
            if getattr(self, name) is not None:
                positive(name)
        if self.block_size not in _BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {_BLOCK_SIZES}, got {self.block_size!r}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if self.scheduling_policy not in _POLICIES:
            raise ValueError(f"scheduling_policy must be one of {_POLICIES}, got {self.scheduling_policy!r}")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if not isinstance(self.max_logprobs, int) or self.max_logprobs < 0:
            raise ValueError(f"max_logprobs must be a non-negative integer, got {self.max_logprobs!r}")
        if self.long_prefill_token_threshold < 0:
            raise ValueError(f"long_prefill_token_threshold must be >= 0, got {self.long_prefill_token_threshold}")
        if self.enable_lora:
            raise ValueError("enable_lora: LoRA adapters are not supported yet")

    def token_budget(self, max_model_len: int) -> int:
        """Tokens a step may schedule: ``max_num_batched_tokens``, or when unset ``max(8192, max_model_len)``
        with chunked prefill off (a whole prompt must fit one step), else 8192."""
        if self.max_num_batched_tokens:
            return self.max_num_batched_tokens
        return 8192 if self.enable_chunked_prefill else max(8192, max_model_len)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

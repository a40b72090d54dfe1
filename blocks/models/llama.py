"""The Llama family: Llama 2/3/3.1/3.2, Mistral, Qwen2/Qwen2.5 and Qwen3 in one implementation.

The families differ only in config flags (:class:`~blocks.models.config.ModelConfig`):

* Llama: RMSNorm, neox RoPE (with Llama-3 / linear / dynamic scaling), SiLU-gated MLP, GQA,
  optional ``attention_bias`` / ``mlp_bias``, tied embeddings in Llama 3.2 1B/3B.
* Mistral: Llama plus a ``sliding_window`` on every layer.
* Qwen2/2.5: bias on q/k/v (not o), tied embeddings for small sizes, sliding window only for
  layers ``>= max_window_layers`` when ``use_sliding_window`` (or as ``layer_types`` says).
* Qwen3: per-head RMSNorm on q and k before RoPE (``q_norm``, ``k_norm``), explicit ``head_dim``.

Parameter names follow the Hugging Face checkpoints except the fused projections:
``self_attn.qkv_proj`` (from ``q_proj``/``k_proj``/``v_proj``) and ``mlp.gate_up_proj`` (from
``gate_proj``/``up_proj``). Shapes: see :mod:`blocks.models.base`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from blocks.attention.backend import AttentionBackend
from blocks.attention.metadata import AttentionMetadata
from blocks.layers import fused as fused_layers
from blocks.layers import l2_prefetch
from blocks.layers.activation import SiluAndMul
from blocks.layers.attention import Attention
from blocks.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from blocks.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from blocks.layers.norm import RMSNorm
from blocks.layers.rotary import RotaryEmbedding
from blocks.layers.tp import TPInfo
from blocks.models.base import CausalLM
from blocks.models.config import ModelConfig
from blocks.models.weights import load_named_weights

__all__ = ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "StepRope"]


class LlamaMLP(nn.Module):
    """``[T, H] -> [T, H]``: ``down(silu(gate(x)) * up(x))`` with gate and up fused."""

    def __init__(self, config: ModelConfig, *, dtype: torch.dtype, tp: TPInfo) -> None:
        super().__init__()
        if config.hidden_act not in ("silu", "swish"):
            raise ValueError(f"hidden_act must be 'silu' for {config.architecture}, got {config.hidden_act!r}")
        inter = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [inter, inter], bias=config.mlp_bias,
                                                       params_dtype=dtype, tp=tp)
        self.down_proj = RowParallelLinear(inter, config.hidden_size, bias=config.mlp_bias, params_dtype=dtype,
                                           tp=tp)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaAttention(nn.Module):
    """``[T, H] -> [T, H]``: fused QKV, (Qwen3 q/k norm), RoPE, paged attention, output projection."""

    def __init__(self, config: ModelConfig, layer_idx: int, *, rotary_emb: RotaryEmbedding,
                 backend: AttentionBackend, dtype: torch.dtype, tp: TPInfo) -> None:
        super().__init__()
        hd = config.head_dim
        self.qkv_proj = QKVParallelLinear(config.hidden_size, hd, config.num_heads, config.num_kv_heads,
                                          bias=config.qkv_bias, params_dtype=dtype, tp=tp)
        self.o_proj = RowParallelLinear(config.num_heads * hd, config.hidden_size, bias=config.o_bias,
                                        params_dtype=dtype, tp=tp)
        self.q_norm = RMSNorm(hd, eps=config.norm_eps, params_dtype=dtype) if config.qk_norm else None
        self.k_norm = RMSNorm(hd, eps=config.norm_eps, params_dtype=dtype) if config.qk_norm else None
        self.rotary_emb = rotary_emb
        self.attn = Attention(self.qkv_proj.num_heads, hd, num_kv_heads=self.qkv_proj.num_kv_heads,
                              backend=backend, sliding_window=config.sliding_windows[layer_idx])
        self.prefetch_after_qkv: tuple[nn.Module, ...] = ()  # linears whose weights go to L2 during attention

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
                metadata: AttentionMetadata, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``rope``: ``rotary_emb.cos_sin(positions)``, computed once per forward by the model (or here)."""
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden))
        l2_prefetch.issue([m.weight for m in self.prefetch_after_qkv])
        if self.q_norm is not None:
            t, hd = q.shape[0], self.attn.head_dim
            q = self.q_norm(q.reshape(t, -1, hd)).reshape(t, -1)
            k = self.k_norm(k.reshape(t, -1, hd)).reshape(t, -1)
        cos, sin = rope if rope is not None else self.rotary_emb.cos_sin(positions)
        q, k = self.rotary_emb.rotate(q, k, cos, sin)
        return self.o_proj(self.attn(q, k, v, kv_cache, metadata))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm decoder layer; the residual stream is carried separately so norms fuse the add."""

    def __init__(self, config: ModelConfig, layer_idx: int, *, rotary_emb: RotaryEmbedding,
                 backend: AttentionBackend, dtype: torch.dtype, tp: TPInfo) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx, rotary_emb=rotary_emb, backend=backend, dtype=dtype,
                                        tp=tp)
        self.mlp = LlamaMLP(config, dtype=dtype, tp=tp)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.norm_eps, params_dtype=dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.norm_eps, params_dtype=dtype)
        # In a decode graph, the weights after the attention stream into L2 while it runs (l2_prefetch).
        self.self_attn.prefetch_after_qkv = (self.self_attn.o_proj, self.mlp.gate_up_proj, self.mlp.down_proj)

    def forward(self, positions, hidden, residual, kv_cache, metadata, rope=None, *, fused=False, input_ids=None,
                embedding=None):
        """``hidden [T, H]`` and ``residual`` (or ``None``) -> ``(hidden, residual)``. ``rope``: the forward's
        ``(cos, sin)`` or a :class:`StepRope`. ``fused``: run the fused decode kernels (the caller checked
        :meth:`decode_fusable`, the same for every layer of a model); then with ``hidden=None`` (the first
        layer) the kernel reads the rows of ``input_ids`` from the ``embedding`` table itself."""
        if fused:
            return self._forward_decode_fused(positions, hidden, residual, kv_cache, metadata, input_ids, embedding)
        if isinstance(rope, StepRope):
            rope = rope.get()
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, metadata, rope)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual

    def decode_fusable(self, num_tokens: int, dtype: torch.dtype, device: torch.device,
                       kv_cache: tuple[torch.Tensor, torch.Tensor]) -> bool:
        """Whether a step of ``num_tokens`` hidden rows runs the fused decode kernels here
        (:func:`blocks.layers.fused.use_decode_fusion`, plus this layer's own conditions: no Qwen3-style q/k
        norm, RoPE over whole heads without dynamic scaling, a KV cache in the activation dtype, one rank)."""
        attn = self.self_attn
        rotary = attn.rotary_emb
        return (fused_layers.use_decode_fusion(num_tokens, self.input_layernorm.hidden_size, device)
                and attn.qkv_proj.tp.size == 1 and attn.q_norm is None and rotary.rotary_dim == attn.attn.head_dim
                and rotary.rope_type != "dynamic" and kv_cache[0].dtype == dtype
                and self.input_layernorm.weight.dtype == dtype)

    def _forward_decode_fused(self, positions, hidden, residual, kv_cache, metadata, input_ids, embedding):
        """The same layer for one token in six kernels (:mod:`blocks.layers.triton_decode_fused`): embedding
        (first layer) + norm + QKV + RoPE + KV write, attention (and its split merge), o_proj, norm + gate_up +
        SiLU-and-mul, down."""
        from blocks.layers.triton_decode_fused import norm_gated_linear, norm_qkv_rope_cache

        attn, mlp, qkv = self.self_attn, self.mlp, self.self_attn.qkv_proj
        norm = self.input_layernorm
        q, residual = norm_qkv_rope_cache(
            hidden, residual, norm.weight, norm.eps, qkv.weight, qkv.bias, positions, attn.rotary_emb.inv_freq,
            kv_cache[0], kv_cache[1], metadata.slot_mapping, num_heads=qkv.num_heads,
            num_kv_heads=qkv.num_kv_heads, head_dim=attn.attn.head_dim, is_neox_style=attn.rotary_emb.is_neox_style,
            input_ids=input_ids, embedding=embedding, inputs_ready=hidden is not None)
        # (only the first layer gets hidden=None; the others follow the previous layer's down projection, which
        # writes neither positions nor slots, so their kernels read them before the PDL wait)
        l2_prefetch.issue([m.weight for m in attn.prefetch_after_qkv], grouped=True)
        hidden = attn.o_proj(attn.attn.attend(q, kv_cache, metadata))
        norm = self.post_attention_layernorm
        hidden, residual = norm_gated_linear(hidden, residual, norm.weight, norm.eps, mlp.gate_up_proj.weight,
                                             mlp.gate_up_proj.bias)
        return mlp.down_proj(hidden), residual


class StepRope:
    """A forward's rotary ``(cos, sin)``, computed on first use: fused decode layers compute their own angles, so
    a step where every layer fuses launches none of these kernels."""

    def __init__(self, rotary_emb: RotaryEmbedding, positions: torch.Tensor) -> None:
        self.rotary_emb, self.positions, self._cos_sin = rotary_emb, positions, None

    def get(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cos_sin is None:
            self._cos_sin = self.rotary_emb.cos_sin(self.positions)
        return self._cos_sin


class LlamaModel(nn.Module):
    """Embedding, decoder layers and the final norm: ``input_ids [T] -> hidden [T, H]``."""

    def __init__(self, config: ModelConfig, *, backend: AttentionBackend, dtype: torch.dtype, tp: TPInfo) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, params_dtype=dtype, tp=tp)
        self.rotary_emb = RotaryEmbedding(config.head_dim, base=config.rope_theta,
                                          max_position_embeddings=config.max_position_embeddings,
                                          is_neox_style=True, scaling=config.rope_scaling)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, rotary_emb=self.rotary_emb, backend=backend, dtype=dtype, tp=tp)
            for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.norm_eps, params_dtype=dtype)

    def forward(self, input_ids, positions, kv_caches, metadata) -> torch.Tensor:
        embed = self.embed_tokens
        # every layer shares the fusion's conditions: decided once a forward
        fused = bool(self.layers) and self.layers[0].decode_fusable(input_ids.shape[0], embed.weight.dtype,
                                                                    input_ids.device, kv_caches[0])
        table = None
        if fused and embed.tp.size == 1 and embed.weight.stride(1) == 1:
            hidden, table = None, embed.weight  # the first fused layer reads the token's embedding row itself
        else:
            hidden = embed(input_ids)
        residual = None
        rope = StepRope(self.rotary_emb, positions)  # once for all layers, if a layer needs it
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(positions, hidden, residual, kv_cache, metadata, rope, fused=fused,
                                     input_ids=input_ids, embedding=table)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(CausalLM):
    """Llama-family causal LM (see the module docstring for the families it covers).

    Args:
        config: the parsed config.
        backend: keyword-only, the attention backend (chosen once).
        dtype: parameter dtype.
        tp: tensor-parallel coordinates (size 1 by default).
    """

    stacked_params_mapping = [
        ("qkv_proj", "q_proj", "q"),
        ("qkv_proj", "k_proj", "k"),
        ("qkv_proj", "v_proj", "v"),
        ("gate_up_proj", "gate_proj", 0),
        ("gate_up_proj", "up_proj", 1),
    ]

    def __init__(self, config: ModelConfig, *, backend: AttentionBackend, dtype: torch.dtype = torch.float32,
                 tp: TPInfo | None = None) -> None:
        super().__init__(config, backend=backend, tp=tp)
        self.model = LlamaModel(config, backend=backend, dtype=dtype, tp=self.tp)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, params_dtype=dtype, tp=self.tp)
        if config.tie_word_embeddings:
            self.lm_head.tie_to(self.model.embed_tokens)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        """See :mod:`blocks.models.base`: ``[T]`` ids and positions -> ``hidden [T, hidden_size]``."""
        self.check_inputs(input_ids, positions, kv_caches)
        return self.model(input_ids, positions, kv_caches, attn_metadata)

    def _rename(self, name: str) -> str | None:
        if "rotary_emb.inv_freq" in name:
            return None
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            return None
        return name

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load full Hugging Face tensors (``model.layers.0.self_attn.q_proj.weight``, ...)."""
        return load_named_weights(self, weights, stacked_params_mapping=self.stacked_params_mapping,
                                  rename=self._rename)


# The other families are the same module with different config flags.
MistralForCausalLM = LlamaForCausalLM
Qwen2ForCausalLM = LlamaForCausalLM
Qwen3ForCausalLM = LlamaForCausalLM

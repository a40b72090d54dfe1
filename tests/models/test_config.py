"""ModelConfig parsing: transformers 4.x and 5.x config.json layouts give the same model config."""

import pytest
import torch

from blocks.models.config import ModelConfig, parse_dtype

LLAMA3_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}
BASE = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 1000, "hidden_size": 96,
        "intermediate_size": 200, "num_hidden_layers": 3, "num_attention_heads": 6, "num_key_value_heads": 2,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
        "eos_token_id": [7, 9]}


def test_v4_and_v5_layouts_parse_the_same():
    v4 = dict(BASE, rope_theta=500000.0, rope_scaling=dict(LLAMA3_SCALING, rope_type="llama3"),
              torch_dtype="bfloat16")
    v5 = dict(BASE, rope_parameters=dict(LLAMA3_SCALING, rope_type="llama3", rope_theta=500000.0), dtype="bfloat16")
    a, b = ModelConfig.from_hf(v4), ModelConfig.from_hf(v5)
    for cfg in (a, b):
        assert cfg.rope_theta == 500000.0 and cfg.rope_scaling["rope_type"] == "llama3"
        assert cfg.rope_scaling["factor"] == 8.0 and cfg.dtype == torch.bfloat16
        assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (3, 6, 2, 16)
        assert cfg.eos_token_ids == [7, 9] and cfg.tie_word_embeddings
    assert a.rope_scaling == b.rope_scaling


def test_legacy_type_key_and_default_rope():
    cfg = ModelConfig.from_hf(dict(BASE, rope_scaling={"type": "linear", "factor": 2.0}))
    assert cfg.rope_scaling == {"type": "linear", "factor": 2.0, "rope_type": "linear"}
    assert ModelConfig.from_hf(dict(BASE, rope_parameters={"rope_type": "default", "rope_theta": 1e6})).rope_scaling \
        is None
    assert ModelConfig.from_hf(dict(BASE)).rope_theta == 10000.0


def test_generation_config_eos_wins():
    cfg = ModelConfig.from_hf(dict(BASE), generation_config={"eos_token_id": 3})
    assert cfg.eos_token_ids == [3]


@pytest.mark.parametrize("extra,expected", [
    ({"model_type": "mistral", "sliding_window": 64}, [64, 64, 64]),
    ({"model_type": "mistral", "sliding_window": None}, [None, None, None]),
    ({"model_type": "qwen2", "sliding_window": 32, "use_sliding_window": True, "max_window_layers": 1}, [None, 32, 32]),
    ({"model_type": "qwen2", "sliding_window": 32, "use_sliding_window": False}, [None, None, None]),
    ({"model_type": "qwen2", "sliding_window": 32,
      "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}, [32, None, 32]),
])
def test_sliding_windows_per_layer(extra, expected):
    assert ModelConfig.from_hf(dict(BASE, **extra)).sliding_windows == expected


def test_family_flags():
    qwen2 = ModelConfig.from_hf(dict(BASE, model_type="qwen2", architectures=["Qwen2ForCausalLM"]))
    assert qwen2.qkv_bias and not qwen2.o_bias and not qwen2.qk_norm
    qwen3 = ModelConfig.from_hf(dict(BASE, model_type="qwen3", head_dim=40))
    assert qwen3.qk_norm and qwen3.head_dim == 40 and not qwen3.qkv_bias
    opt = ModelConfig.from_hf({"architectures": ["OPTForCausalLM"], "model_type": "opt", "vocab_size": 50,
                               "hidden_size": 64, "ffn_dim": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                               "word_embed_proj_dim": 32, "do_layer_norm_before": False})
    assert opt.num_kv_heads == 4 and opt.intermediate_size == 256 and opt.word_embed_proj_dim == 32
    assert not opt.final_layer_norm and opt.tie_word_embeddings and opt.qkv_bias and opt.hidden_act == "relu"


def test_kv_bytes_per_block():
    cfg = ModelConfig.from_hf(dict(BASE))
    assert cfg.kv_bytes_per_block(16, torch.float16) == 2 * 3 * 16 * 2 * 16 * 2


def test_missing_fields_and_bad_values_are_named():
    with pytest.raises(ValueError, match="architectures"):
        ModelConfig.from_hf({k: v for k, v in BASE.items() if k != "architectures"})
    with pytest.raises(ValueError, match="'hidden_size'"):
        ModelConfig.from_hf({k: v for k, v in BASE.items() if k != "hidden_size"})
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        ModelConfig.from_hf(dict(BASE, num_key_value_heads=4))
    with pytest.raises(ValueError, match="float32, float16, bfloat16"):
        parse_dtype("float8")
    assert parse_dtype("torch.bfloat16") is torch.bfloat16

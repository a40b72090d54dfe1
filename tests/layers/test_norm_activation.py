"""RMSNorm (plain and fused residual), LayerNorm and activations against transformers / torch."""

import pytest
import torch
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from blocks.layers.activation import ACT_NAMES, SiluAndMul, get_act_fn
from blocks.layers.norm import LayerNorm, RMSNorm


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rmsnorm_matches_transformers(dtype):
    hidden = 23
    x = (torch.randn(7, hidden) * 3).to(dtype)
    weight = torch.randn(hidden).to(dtype)
    ours = RMSNorm(hidden, eps=1e-5, params_dtype=dtype)
    ours.weight.data.copy_(weight)
    ref = LlamaRMSNorm(hidden, eps=1e-5).to(dtype)
    ref.weight.data.copy_(weight)
    out = ours(x)
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref(x), atol=0, rtol=0)


def test_rmsnorm_fused_residual_returns_norm_of_sum_and_the_sum():
    x, res = torch.randn(5, 16), torch.randn(5, 16)
    norm = RMSNorm(16)
    norm.weight.data.normal_()
    out, new_res = norm(x, res)
    torch.testing.assert_close(new_res, x + res)
    torch.testing.assert_close(out, norm(x + res))
    with pytest.raises(ValueError, match="last dim 16"):
        norm(torch.randn(2, 15))


def test_layernorm_matches_torch():
    x = torch.randn(4, 9) * 5 + 1
    ours = LayerNorm(9)
    ours.weight.data.normal_()
    ours.bias.data.normal_()
    ref = torch.nn.LayerNorm(9)
    ref.load_state_dict({"weight": ours.weight.data, "bias": ours.bias.data})
    torch.testing.assert_close(ours(x), ref(x))
    plain = LayerNorm(9, elementwise_affine=False)
    torch.testing.assert_close(plain(x), torch.nn.functional.layer_norm(x, (9,)))


def test_silu_and_mul():
    x = torch.randn(3, 5, 14)
    torch.testing.assert_close(SiluAndMul()(x), torch.nn.functional.silu(x[..., :7]) * x[..., 7:])
    with pytest.raises(ValueError, match="even"):
        SiluAndMul()(torch.randn(2, 3))


@pytest.mark.parametrize("name", ACT_NAMES)
def test_activations_match_transformers_names(name):
    x = torch.randn(50) * 4
    torch.testing.assert_close(get_act_fn(name)(x), ACT2FN[name](x), atol=1e-5, rtol=1e-5)


def test_unknown_activation_lists_the_supported_ones():
    with pytest.raises(ValueError, match="relu"):
        get_act_fn("mish-ish")

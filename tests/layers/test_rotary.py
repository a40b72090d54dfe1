"""Rotary embeddings against transformers' own rotary (every scaling, past the original context)."""

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from blocks.layers.rotary import RotaryEmbedding

HEAD_DIM, MAX_POS = 32, 64
SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "legacy-linear": {"type": "linear", "factor": 2.5},
    "dynamic": {"rope_type": "dynamic", "factor": 3.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": MAX_POS},
}


def _hf_rotary(scaling, theta):
    cfg = LlamaConfig(hidden_size=HEAD_DIM * 4, num_attention_heads=4, max_position_embeddings=MAX_POS,
                      rope_theta=theta, rope_scaling=scaling)
    return LlamaRotaryEmbedding(config=cfg)


def _hf_apply(rot, positions, q, k):
    """q, k: [T, heads, head_dim] -> rotated by transformers (batch of one sequence)."""
    cos, sin = rot(q, positions[None])
    qh, kh = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    return qh[0].transpose(0, 1), kh[0].transpose(0, 1)


@pytest.mark.parametrize("kind", list(SCALINGS))
def test_neox_matches_transformers_beyond_the_original_context(kind):
    theta = 500000.0 if kind == "llama3" else 10000.0
    n = 3 * MAX_POS + 5  # every scaling is active past MAX_POS
    positions = torch.arange(n)
    q, k = torch.randn(n, 4, HEAD_DIM), torch.randn(n, 2, HEAD_DIM)
    ours = RotaryEmbedding(HEAD_DIM, base=theta, max_position_embeddings=MAX_POS, scaling=SCALINGS[kind])
    oq, ok = ours(positions, q.reshape(n, -1), k.reshape(n, -1))
    rq, rk = _hf_apply(_hf_rotary(SCALINGS[kind], theta), positions, q, k)
    torch.testing.assert_close(oq.view(n, 4, HEAD_DIM), rq, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ok.view(n, 2, HEAD_DIM), rk, atol=2e-5, rtol=1e-5)
    if kind != "default":  # the scaling changes the far positions (so the test sees it)
        plain, _ = RotaryEmbedding(HEAD_DIM, base=theta, max_position_embeddings=MAX_POS)(positions, q, k)
        assert (plain[-1] - oq.view(n, 4, HEAD_DIM)[-1]).abs().max() > 1e-2


def test_dynamic_matches_transformers_through_prefill_then_decode():
    """transformers recomputes dynamic NTK frequencies as the sequence grows; so do we, per call."""
    scaling = SCALINGS["dynamic"]
    hf = _hf_rotary(scaling, 10000.0)
    ours = RotaryEmbedding(HEAD_DIM, base=10000.0, max_position_embeddings=MAX_POS, scaling=scaling)
    prefill = MAX_POS - 3
    steps = [torch.arange(prefill)] + [torch.tensor([p]) for p in range(prefill, MAX_POS + 9)]
    for positions in steps:
        q, k = torch.randn(len(positions), 2, HEAD_DIM), torch.randn(len(positions), 1, HEAD_DIM)
        oq, ok = ours(positions, q, k)
        rq, rk = _hf_apply(hf, positions, q, k)
        torch.testing.assert_close(oq, rq, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(ok, rk, atol=2e-5, rtol=1e-5)


def _complex_rotate(x, positions, rotary_dim, base, pairs):
    """Independent formula: pair (a, b) as a + ib, multiplied by exp(i * p * theta^(-2j/d))."""
    out = x.clone().double()
    for j in range(rotary_dim // 2):
        a_idx, b_idx = pairs(j)
        angle = positions.double()[:, None] * base ** (-2 * j / rotary_dim)
        z = torch.complex(x[..., a_idx].double(), x[..., b_idx].double()) * torch.exp(1j * angle)
        out[..., a_idx], out[..., b_idx] = z.real, z.imag
    return out.float()


@pytest.mark.parametrize("neox", [True, False])
def test_styles_match_the_complex_rotation_and_partial_dims_pass_through(neox):
    head_dim, rotary_dim, n = 12, 8, 9
    positions = torch.randint(0, 500, (n,))
    q, k = torch.randn(n, 3, head_dim), torch.randn(n, 1, head_dim)
    rope = RotaryEmbedding(head_dim, rotary_dim=rotary_dim, base=1000.0, is_neox_style=neox)
    oq, ok = rope(positions, q, k)
    pairs = (lambda j: (j, j + rotary_dim // 2)) if neox else (lambda j: (2 * j, 2 * j + 1))
    torch.testing.assert_close(oq, _complex_rotate(q, positions, rotary_dim, 1000.0, pairs), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ok, _complex_rotate(k, positions, rotary_dim, 1000.0, pairs), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(oq[..., rotary_dim:], q[..., rotary_dim:], atol=0, rtol=0)


def test_gptj_style_differs_from_neox():
    positions = torch.arange(1, 6)
    q = torch.randn(5, 2, 16)
    a, _ = RotaryEmbedding(16, is_neox_style=True)(positions, q, q)
    b, _ = RotaryEmbedding(16, is_neox_style=False)(positions, q, q)
    assert (a - b).abs().max() > 1e-2


def test_rotation_preserves_norms_and_relative_positions():
    rope = RotaryEmbedding(16, base=10000.0)
    q, k = torch.randn(1, 1, 16), torch.randn(1, 1, 16)
    dots = []
    for shift in (0, 37):
        rq, _ = rope(torch.tensor([5 + shift]), q, q)
        rk, _ = rope(torch.tensor([2 + shift]), k, k)
        dots.append(float((rq * rk).sum()))
        assert math.isclose(float(rq.norm()), float(q.norm()), rel_tol=1e-5)
    assert math.isclose(dots[0], dots[1], rel_tol=1e-4, abs_tol=1e-5)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="rope_type"):
        RotaryEmbedding(16, scaling={"rope_type": "sideways"})
    with pytest.raises(ValueError, match="rotary_dim"):
        RotaryEmbedding(16, rotary_dim=7)
    with pytest.raises(ValueError, match="positions"):
        RotaryEmbedding(16)(torch.arange(3), torch.randn(4, 16), torch.randn(4, 16))

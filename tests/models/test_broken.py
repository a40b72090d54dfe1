"""The parity check catches a broken model: wrong rotary style, wrong weight mapping, wrong positions."""

import pytest

from blocks.models import opt
from blocks.models.check import check_family
from blocks.models.llama import LlamaForCausalLM
from blocks.models.weights import load_named_weights


def _run(family, tmp_path, hook=None):
    return check_family(family, workdir=tmp_path, max_new_tokens=8, prompt_lens=(7, 33), model_hook=hook)


def test_gptj_rotary_instead_of_neox_fails(tmp_path):
    assert _run("llama3", tmp_path).passed  # the same run passes unbroken

    def gptj(model):
        model.model.rotary_emb.is_neox_style = False

    result = _run("llama3", tmp_path, gptj)
    assert not result.passed and result.max_abs_diff > 1e-2, result


def test_dropping_the_llama3_rope_scaling_fails(tmp_path):
    def unscaled(model):
        rope = model.model.rotary_emb
        rope.inv_freq = 1.0 / (rope.base ** (rope.inv_freq.new_tensor(range(0, rope.rotary_dim, 2)) / rope.rotary_dim))

    result = _run("llama3", tmp_path, unscaled)
    assert not result.passed and result.max_abs_diff > 1e-3, result


@pytest.mark.parametrize("swap", [("k_proj", "v_proj"), ("gate_proj", "up_proj")])
def test_swapped_weight_mapping_fails(swap, tmp_path, monkeypatch):
    a, b = swap

    def swapped_load(self, weights):
        def renamed():
            for name, tensor in weights:
                if f".{a}." in name:
                    name = name.replace(a, b)
                elif f".{b}." in name:
                    name = name.replace(b, a)
                yield name, tensor

        return load_named_weights(self, renamed(), stacked_params_mapping=self.stacked_params_mapping,
                                  rename=self._rename)

    monkeypatch.setattr(LlamaForCausalLM, "load_weights", swapped_load)
    result = _run("qwen2", tmp_path)
    assert not result.passed and result.max_abs_diff > 1e-2, result


def test_opt_without_the_position_offset_fails(tmp_path, monkeypatch):
    assert _run("opt", tmp_path).passed
    # after loading (the table keeps its size), look positions up without OPT's offset of 2
    result = _run("opt", tmp_path, lambda model: monkeypatch.setattr(opt, "POSITION_OFFSET", 0))
    assert not result.passed and result.max_abs_diff > 1e-2, result

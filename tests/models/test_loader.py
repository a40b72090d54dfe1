"""Loader: formats (single file, shards, dummy), dtypes, tied weights, and clear errors."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from blocks.models.check import build_tiny_checkpoint, random_prompts
from blocks.models.harness import greedy_generate
from blocks.models.loader import load_model
from blocks.models.registry import supported_architectures


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "qwen2"
    build_tiny_checkpoint("qwen2", path, seed=5)
    return path


@pytest.fixture
def tiny_copy(tiny_dir, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(tiny_dir, dst)
    return dst


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (path / "config.json").write_text(json.dumps(cfg))


def test_loads_weights_fused_and_tied(tiny_dir):
    model = load_model(tiny_dir, attn_backend="torch")
    sd = load_file(str(tiny_dir / "model.safetensors"))
    attn = model.model.layers[1].self_attn
    q, k, v = attn.qkv_proj.split(attn.qkv_proj.weight.T)
    torch.testing.assert_close(q.T, sd["model.layers.1.self_attn.q_proj.weight"])
    torch.testing.assert_close(v.T, sd["model.layers.1.self_attn.v_proj.weight"])
    gate, up = model.model.layers[0].mlp.gate_up_proj.weight.chunk(2)
    torch.testing.assert_close(up, sd["model.layers.0.mlp.up_proj.weight"])
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied: no lm_head.weight in the file
    assert "lm_head.weight" not in sd
    assert (model.num_layers, model.num_kv_heads, model.head_dim, model.vocab_size) == (2, 2, 16, 256)
    assert not model.training and model.dtype == torch.float32


def test_sharded_checkpoint_loads_the_same_model(tmp_path):
    hf = build_tiny_checkpoint("llama2", tmp_path / "one", seed=2)
    hf.save_pretrained(str(tmp_path / "sharded"), max_shard_size="60KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    a, b = load_model(tmp_path / "one"), load_model(tmp_path / "sharded")
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p, q, msg=name)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    (tmp_path / "sharded" / sorted(set(index["weight_map"].values()))[-1]).unlink()
    with pytest.raises(FileNotFoundError, match="shard"):
        load_model(tmp_path / "sharded")


@pytest.mark.parametrize("dtype,expected", [("float16", torch.float16), ("bfloat16", torch.bfloat16),
                                            (torch.float32, torch.float32)])
def test_dtype_selection(tiny_dir, dtype, expected):
    model = load_model(tiny_dir, dtype=dtype)
    assert all(p.dtype == expected for p in model.parameters())


def test_auto_dtype_reads_the_config_in_both_layouts(tiny_copy):
    _edit_config(tiny_copy, dtype=None, torch_dtype="bfloat16")  # transformers 4.x key
    assert load_model(tiny_copy).dtype == torch.bfloat16
    _edit_config(tiny_copy, torch_dtype=None, dtype="float16")  # 5.x key
    assert load_model(tiny_copy).dtype == torch.float16


def test_fp16_model_runs_and_tracks_fp32(tiny_dir):
    prompts = random_prompts((5, 18))
    ref = greedy_generate(load_model(tiny_dir), prompts, 4)
    half = greedy_generate(load_model(tiny_dir, dtype="float16"), prompts, 4)
    assert max(float((a - b).abs().max()) for a, b in zip(ref.logits, half.logits)) < 0.1


def test_dummy_weights_need_no_weight_files(tiny_copy):
    (tiny_copy / "model.safetensors").unlink()
    model = load_model(tiny_copy, load_format="dummy")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert model.model.layers[0].self_attn.qkv_proj.weight.std() > 0.01
    cfg = json.loads((tiny_copy / "config.json").read_text())
    cfg.update(num_hidden_layers=3, hidden_size=96, num_attention_heads=6, num_key_value_heads=3)
    big = load_model("any-label", load_format="dummy", trust_config=cfg)
    assert big.num_layers == 3 and big.model.embed_tokens.weight.shape == (256, 96)
    out = greedy_generate(big, [[1, 2, 3]], 2)
    assert len(out.tokens[0]) == 2


# --- errors -------------------------------------------------------------------------------------


def test_missing_folder_config_and_weights(tmp_path, tiny_copy):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tiny_copy / "model.safetensors").unlink()
    (tiny_copy / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors.*\.bin checkpoints are not supported"):
        load_model(tiny_copy)
    (tiny_copy / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        load_model(tiny_copy)


def test_unknown_architecture_is_named_with_the_supported_list(tiny_copy):
    _edit_config(tiny_copy, architectures=["GPTNeoXForCausalLM"])
    with pytest.raises(ValueError, match="GPTNeoXForCausalLM") as err:
        load_model(tiny_copy)
    assert all(name in str(err.value) for name in supported_architectures())


def test_bad_dtype_and_options(tiny_dir):
    with pytest.raises(ValueError, match="float32, float16, bfloat16"):
        load_model(tiny_dir, dtype="int8")
    with pytest.raises(ValueError, match="load_format"):
        load_model(tiny_dir, load_format="pt")
    with pytest.raises(ValueError, match="attn_backend"):
        load_model(tiny_dir, attn_backend="flash")


def test_dtype_unsupported_on_the_device(tiny_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla T4")
    with pytest.raises(ValueError, match="bfloat16 is not supported on device 'cuda'.*T4"):
        load_model(tiny_dir, dtype="bfloat16", device="cuda")


def test_cuda_requested_without_cuda(tiny_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        load_model(tiny_dir, device="cuda")


def test_shape_mismatch_names_the_tensor_and_both_shapes(tiny_copy):
    sd = load_file(str(tiny_copy / "model.safetensors"))
    sd["model.layers.1.self_attn.k_proj.weight"] = torch.randn(24, 64)
    save_file(sd, str(tiny_copy / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight.*\(24, 64\).*\(32, 64\)"):
        load_model(tiny_copy)


def test_missing_and_unexpected_tensors(tiny_copy):
    sd = load_file(str(tiny_copy / "model.safetensors"))
    extra = dict(sd, **{"model.layers.0.mlp.extra_proj.weight": torch.randn(2, 2)})
    save_file(extra, str(tiny_copy / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="extra_proj.*matches no parameter"):
        load_model(tiny_copy)
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, str(tiny_copy / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks weights.*layers\.1\.mlp\.gate_up_proj\.weight#1"):
        load_model(tiny_copy)


def test_hub_id_offline_says_not_found_locally_and_not_downloadable(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(FileNotFoundError, match="not found locally.*could not be downloaded"):
        load_model("blocks-test/definitely-not-a-model")


def test_hub_id_download_failure_is_reported(monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot(repo_id, *, local_files_only=False, **kwargs):
        calls.append(local_files_only)
        raise (FileNotFoundError("no cached snapshot") if local_files_only else ConnectionError("network is down"))

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    with pytest.raises(FileNotFoundError, match="not found locally.*no cached snapshot.*network is down"):
        load_model("org/model")
    assert calls == [True, False]  # the local cache is tried first, then the hub

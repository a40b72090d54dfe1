"""Build a model from a Hugging Face folder or hub id: ``load_model``.

Usage::

    from blocks.models.loader import load_model
    model = load_model("/path/to/Llama-3.2-1B", dtype="auto", device="cuda")
    model = load_model("Qwen/Qwen2.5-0.5B", load_format="dummy")     # real shapes, random weights

Signature::

    load_model(model, *, dtype="auto", device="cpu", load_format="auto", attn_backend="auto",
               trust_config=None, tp=None, seed=0) -> CausalLM

* ``model``: a local folder holding ``config.json`` and ``model.safetensors`` (or shards listed in
  ``model.safetensors.index.json``; ``generation_config.json`` optional), or a hub id. A hub id is
  looked up in the local Hugging Face cache first (``local_files_only``) and downloaded only if
  that fails and the hub is reachable; otherwise the error says it was not found locally and could
  not be downloaded.
* ``dtype``: ``"auto"`` (the config's ``dtype`` / ``torch_dtype``, float32 if absent) or
  ``"float32"``, ``"float16"``, ``"bfloat16"`` (or a ``torch.dtype``). Checked against the device.
* ``device``: where parameters are allocated (weights are streamed there from memory-mapped files).
* ``load_format``: ``"auto"``/``"safetensors"`` read the checkpoint; ``"dummy"`` builds random
  weights at the config's shapes without reading weight files (benchmarks at real sizes).
* ``attn_backend``: ``"torch" | "triton" | "cupy" | "auto"`` (chosen once, see
  :func:`blocks.attention.backend.get_attention_backend`).
* ``trust_config``: a ``config.json`` dict to use as-is instead of reading one; with
  ``load_format="dummy"`` no files are needed at all (``model`` is then only a label).
* ``tp``: tensor-parallel coordinates (:class:`~blocks.layers.tp.TPInfo`); each rank loads its shard.
* ``seed``: seed of the dummy weights.

The returned model is in eval mode and carries ``model.config`` (a
:class:`~blocks.models.config.ModelConfig`), ``model.generation_config`` (dict, possibly empty) and
``model.model_path`` (folder or ``None``).

Errors: missing folder/files -> ``FileNotFoundError`` naming what is missing; unknown architecture,
bad dtype, dtype unsupported on the device, shape mismatches (checkpoint tensor name and both
shapes), missing or unexpected tensors -> ``ValueError``.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from blocks.attention.backend import BACKEND_NAMES, get_attention_backend
from blocks.layers.tp import TPInfo
from blocks.models.base import CausalLM
from blocks.models.config import ModelConfig, parse_dtype
from blocks.models.registry import resolve_model_class
from blocks.models.weights import missing_weights

__all__ = ["load_model", "resolve_model_path", "read_config", "check_dtype_supported", "iter_safetensors",
           "safetensors_files", "LOAD_FORMATS"]

LOAD_FORMATS = ("auto", "safetensors", "dummy")
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.tiktoken"]


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~", ".\\")) or os.path.exists(name) or name.count("/") > 1


def resolve_model_path(model: str | os.PathLike, *, need_weights: bool = True) -> Path:
    """A local folder for ``model`` (a folder path or a hub id).

    Raises:
        FileNotFoundError: a path that is not a folder, or a hub id that is neither in the local
            cache nor downloadable (offline); the message says which.
    """
    name = os.fspath(model)
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if _looks_like_path(name):
        what = "is a file, not a model folder" if path.exists() else "does not exist"
        raise FileNotFoundError(f"model path {name!r} {what}")
    try:
        import huggingface_hub
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise FileNotFoundError(f"model {name!r} is not a local folder and huggingface_hub is not installed") from exc
    patterns = _HUB_PATTERNS if need_weights else [p for p in _HUB_PATTERNS if p != "*.safetensors"]
    try:
        return Path(huggingface_hub.snapshot_download(name, local_files_only=True, allow_patterns=patterns))
    except Exception as local_exc:  # noqa: BLE001 - any failure means "not in the cache"
        local_reason = f"{type(local_exc).__name__}: {local_exc}"
    offline = str(os.environ.get("HF_HUB_OFFLINE", "")).lower() in ("1", "true", "yes", "on")
    if offline:
        remote_reason = "HF_HUB_OFFLINE is set, downloads are disabled"
    else:
        try:
            return Path(huggingface_hub.snapshot_download(name, allow_patterns=patterns))
        except Exception as exc:  # noqa: BLE001 - network, auth, missing repo
            remote_reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    raise FileNotFoundError(
        f"model {name!r} was not found locally (not a folder, not in the Hugging Face cache: {local_reason}) "
        f"and could not be downloaded ({remote_reason}). Pass a local folder with config.json and "
        f"*.safetensors, or download the model on a machine with network access."
    )


def read_config(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(config.json dict, generation_config.json dict or {})`` of a model folder."""
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"config.json not found in model folder {str(path)!r}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{cfg_path} is not valid JSON: {exc}") from exc
    gen: dict[str, Any] = {}
    gen_path = path / "generation_config.json"
    if gen_path.is_file():
        try:
            gen = json.loads(gen_path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{gen_path} is not valid JSON: {exc}") from exc
    return cfg, gen


def check_dtype_supported(dtype: torch.dtype, device: torch.device | str) -> None:
    """Raise ``ValueError`` if ``dtype`` cannot run on ``device`` (e.g. bfloat16 before Ampere)."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} requested but CUDA is not available on this machine")
        if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise ValueError(f"dtype bfloat16 is not supported on device {str(device)!r} "
                             f"({torch.cuda.get_device_name(device)}); use dtype='float16'")
        return
    if device.type == "cpu":
        return
    try:  # other backends: probe a matmul
        a = torch.ones(2, 2, dtype=dtype, device=device)
        (a @ a).sum().item()
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"dtype {dtype} is not supported on device {str(device)!r}: {exc}") from exc


def safetensors_files(path: Path) -> list[Path]:
    """The checkpoint's safetensors files: from the shard index if present, else ``*.safetensors``."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise ValueError(f"{index} is not a valid safetensors index (needs 'weight_map'): {exc}") from exc
        files = sorted({path / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"shard(s) {missing} listed in {index.name} are missing from {str(path)!r}")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        present = sorted(p.name for p in path.iterdir())
        hint = " (PyTorch .bin checkpoints are not supported; convert to safetensors)" if any(
            n.endswith(".bin") for n in present) else ""
        raise FileNotFoundError(f"no model.safetensors (or model.safetensors.index.json) in {str(path)!r}{hint}; "
                                f"found: {present}")
    return files


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` from memory-mapped safetensors files, one tensor at a time (CPU)."""
    from safetensors import safe_open

    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as reader:
            for name in reader.keys():  # noqa: SIM118 - safe_open is not a dict
                yield name, reader.get_tensor(name)


def _init_dummy(model: CausalLM, seed: int, full_model: CausalLM | None = None) -> None:
    """Random weights that depend only on ``seed`` and each parameter's name and FULL (unsharded) value.

    Each parameter draws from its own generator (seeded by ``seed`` and the name), so a tensor-parallel
    rank can draw the full tensor and keep its shard through the parameter's ``weight_loader``: TP=N
    then computes the same model as TP=1. ``full_model`` is the unsharded twin on the meta device (shapes
    only), given when ``model`` is sharded.
    """
    full_shapes = {n: tuple(p.shape) for n, p in full_model.named_parameters()} if full_model is not None else {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            gen = torch.Generator(device=p.device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            shape = full_shapes.get(name, tuple(p.shape))
            full = p if shape == tuple(p.shape) else torch.empty(shape, dtype=p.dtype, device=p.device)
            if p.dim() == 1 and "norm" in name:
                full.fill_(1.0).add_(torch.randn(shape, generator=gen, device=p.device, dtype=p.dtype), alpha=0.01)
            else:
                full.normal_(0.0, 0.02, generator=gen)
            if full is not p:
                p.weight_loader(p, full)


def load_model(
    model: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "auto",
    device: torch.device | str = "cpu",
    load_format: str = "auto",
    attn_backend: str = "auto",
    trust_config: dict[str, Any] | None = None,
    tp: TPInfo | None = None,
    seed: int = 0,
) -> CausalLM:
    """Build and load a model; see the module docstring for every argument and error."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")
    if attn_backend not in BACKEND_NAMES:
        raise ValueError(f"attn_backend must be one of {BACKEND_NAMES}, got {attn_backend!r}")
    dummy = load_format == "dummy"
    path: Path | None = None
    if trust_config is not None and dummy:
        cfg, gen = dict(trust_config), {}
    else:
        path = resolve_model_path(model, need_weights=not dummy)
        cfg, gen = read_config(path)
        if trust_config is not None:
            cfg = dict(trust_config)
    model_cls = resolve_model_class(cfg.get("architectures") or [])
    config = ModelConfig.from_hf(cfg, generation_config=gen)
    torch_dtype = config.dtype if dtype == "auto" else parse_dtype(dtype)
    device = torch.device(device)
    check_dtype_supported(torch_dtype, device)
    files = None if dummy else safetensors_files(path)
    backend = get_attention_backend(attn_backend, device)
    with torch.device(device):
        net = model_cls(config, backend=backend, dtype=torch_dtype, tp=tp)
    if dummy:
        full = None
        if tp is not None and tp.size > 1:
            with torch.device("meta"):
                full = model_cls(config, backend=backend, dtype=torch_dtype)
        _init_dummy(net, seed, full)
    else:
        loaded = net.load_weights(iter_safetensors(files))
        missing = missing_weights(net, loaded, stacked_params_mapping=net.stacked_params_mapping)
        if missing:
            shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            raise ValueError(f"checkpoint in {str(path)!r} lacks weights for {len(missing)} parameter(s): {shown}")
    net.eval()
    net.generation_config = gen
    net.model_path = path
    return net

"""Where the embedded default model lives: a Hugging Face folder shipped inside the ``blocks`` package.

``blocks serve``, ``blocks generate`` and ``LLM()`` fall back to it when no model is given, so the toolkit
runs on a fresh machine with no GPU and no internet. The folder (``config.json``, ``model.safetensors``,
``generation_config.json``, ``tokenizer.json``, ``tokenizer_config.json``, ``README.md``,
``heldout.jsonl``) is produced by ``scripts/train_default_model.py``; see its ``README.md`` for what the
model is (a tiny demo chat model) and how to reproduce it.

Example::

    from blocks.default_model_path import default_model_path
    path = default_model_path()  # str, loadable by transformers and by blocks' loader
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL_PATH: Path = Path(__file__).resolve().parent / "default_model"
"""Absolute path of the shipped model folder inside the installed package."""

_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def default_model_path(*, check: bool = True) -> str:
    """The shipped default model folder as a string (what ``from_pretrained`` and our loader accept).

    With ``check`` (the default) the folder must hold a loadable model; a missing file raises
    ``FileNotFoundError`` naming it (e.g. an install without package data, or an untrained checkout).
    """
    if check:
        for name in _REQUIRED_FILES:
            if not (DEFAULT_MODEL_PATH / name).is_file():
                raise FileNotFoundError(
                    f"default model file {name!r} is missing from {DEFAULT_MODEL_PATH}; reinstall blocks or run "
                    "scripts/train_default_model.py --out blocks/default_model"
                )
    return str(DEFAULT_MODEL_PATH)

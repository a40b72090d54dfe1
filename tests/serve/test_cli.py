"""``blocks serve`` flags: vLLM's names, each documented in --help; invalid values fail before any process starts."""

from __future__ import annotations

import subprocess
import sys

import pytest

from blocks.cli import main
from tests.serve.conftest import ROOT

FLAGS = ["--host", "--port", "--served-model-name", "--api-key", "--dtype", "--max-model-len", "--max-num-seqs",
         "--max-num-batched-tokens", "--gpu-memory-utilization", "--block-size", "--enable-prefix-caching",
         "--no-enable-prefix-caching", "--tensor-parallel-size", "--kv-cache-dtype", "--scheduling-policy",
         "--max-num-queued-requests", "--max-logprobs", "--enforce-eager", "--seed", "--chat-template",
         "--root-path", "--device", "--strict-fields", "--shutdown-timeout", "--max-request-body-bytes"]


def test_help_documents_every_flag():
    out = subprocess.run([sys.executable, "-m", "blocks.cli", "serve", "--help"], capture_output=True, text=True,
                         cwd=str(ROOT), check=True).stdout
    assert "BLOCKS_API_KEY" in out and "default: 8000" in out
    for flag in FLAGS:
        assert flag in out, flag


@pytest.mark.parametrize("argv, word", [
    (["--block-size", "7"], "block_size"),
    (["--max-num-seqs", "0"], "max_num_seqs"),
    (["--gpu-memory-utilization", "1.5"], "gpu_memory_utilization"),
    (["--max-model-len", "0"], "max_model_len"),
])
def test_invalid_engine_flags_exit_2_naming_the_field(argv, word, capsys):
    assert main(["serve", "unused-model", *argv]) == 2
    assert word in capsys.readouterr().out


def test_api_key_comes_from_the_flag_then_the_environment(monkeypatch):
    from serve.cli import resolve_api_key

    monkeypatch.delenv("BLOCKS_API_KEY", raising=False)
    assert resolve_api_key(None) is None
    monkeypatch.setenv("BLOCKS_API_KEY", "from-env")
    assert resolve_api_key(None) == "from-env" and resolve_api_key("flag") == "flag"
    monkeypatch.setenv("BLOCKS_API_KEY", "")
    assert resolve_api_key(None) is None

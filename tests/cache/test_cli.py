"""``blocks kv-cache`` prints the sizing computed by blocks.cache.kv_tensors."""

import pytest

from blocks.cli import main


def test_kv_cache_command_llama3_8b(capsys):
    rc = main(["kv-cache", "--num-layers", "32", "--num-kv-heads", "8", "--head-dim", "128", "--dtype", "bfloat16",
               "--budget-gib", "20", "--max-model-len", "8192"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "bytes per token : 131,072 (128.0 KiB)" in out
    assert "blocks          : 10,240" in out and "token capacity  : 163,840" in out
    assert "(max_model_len=8192): 20" in out


@pytest.mark.parametrize("flags,message", [
    (["--budget-gib", "0"], "budget_bytes=0 holds 0 blocks"),
    (["--budget-gib", "1", "--block-size", "0"], "--block-size must be positive"),
])
def test_kv_cache_command_reports_bad_input_with_exit_code_2(capsys, flags, message):
    rc = main(["kv-cache", "--num-layers", "2", "--num-kv-heads", "1", "--head-dim", "8", *flags])
    assert rc == 2 and message in capsys.readouterr().err

"""``blocks generate`` and ``blocks bench`` on a tiny model (CPU, seconds)."""

import json

from blocks.cli import main


def test_bench_throughput_with_hf_peer_writes_json(tiny_llama, tmp_path):
    path, _ = tiny_llama
    out = tmp_path / "r.json"
    rc = main(["bench", "throughput", "--model", path, "--load-format", "auto", "--device", "cpu", "--dtype",
               "float32", "--num-prompts", "6", "--input-len-range", "4", "12", "--output-len-range", "2", "5",
               "--max-model-len", "64", "--max-num-seqs", "4", "--peer", "hf", "--peer-num-prompts", "4",
               "--peer-batch-size", "2", "--bandwidth-tbps", "0.01", "--output-json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["num_prompts"] == 6 and result["output_tokens_per_s"] > 0
    assert result["peer_hf"]["num_prompts"] == 4 and result["ratio_vs_hf"] > 0
    assert result["steps"] >= 5 and result["fraction_of_floor"] > 0


def test_bench_latency_reports_decode_time(tiny_llama, tmp_path):
    path, _ = tiny_llama
    out = tmp_path / "l.json"
    assert main(["bench", "latency", "--model", path, "--load-format", "auto", "--device", "cpu", "--dtype",
                 "float32", "--input-len", "8", "--output-len", "4", "--num-iters", "1", "--max-model-len", "64",
                 "--output-json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["decode_ms_per_step"] > 0 and result["host_ms_per_step"] > 0


def test_generate_prints_text_and_throughput(tiny_llama, capsys):
    path, _ = tiny_llama
    assert main(["generate", "--model", path, "--raw", "--max-tokens", "5", "--device", "cpu", "The quick"]) == 0
    printed = capsys.readouterr().out
    assert "> The quick" in printed and "output tokens/s" in printed

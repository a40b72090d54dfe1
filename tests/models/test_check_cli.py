"""``blocks check-models`` prints the table and its exit code reflects mismatches."""

from blocks import cli


def test_check_models_cli_passes_and_prints_the_table(capsys):
    code = cli.main(["check-models", "--families", "opt-350m", "qwen3", "--max-new-tokens", "6"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "max |diff|" in out and "opt-350m" in out and "qwen3" in out and "30/30" in out
    assert "2/2 families match transformers" in out


def test_check_models_cli_exits_nonzero_on_mismatch(capsys):
    code = cli.main(["check-models", "--families", "llama2", "--max-new-tokens", "3", "--atol", "0"])
    out = capsys.readouterr().out
    assert code == 1 and "MISMATCH" in out

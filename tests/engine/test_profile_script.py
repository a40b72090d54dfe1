"""``benchmarks/engine_profile.py`` (the device profiling script) still runs against the engine's internals."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_engine_profile_script_runs_on_the_default_model(tmp_path):
    out = tmp_path / "profile.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "engine_profile.py"), "--model", "default", "--load-format",
         "auto", "--steps", "4", "--max-model-len", "256", "--input-len", "16", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["wall_ms"] > 0 and result["phases_ms"]["schedule"] > 0
    assert "runner.requests.apply" in result["phases_ms"]


def test_step_profiler_writes_a_table_of_ten_steps(tmp_path, monkeypatch):
    import os

    import blocks.engine.step_profile as step_profile
    from blocks import LLM, SamplingParams

    monkeypatch.setenv("BLOCKS_ENGINE_PROFILE", str(tmp_path / "prof"))
    monkeypatch.setattr(step_profile, "START", 3)
    llm = LLM(device="cpu", skip_tokenizer_init=True)
    llm.generate([{"prompt_token_ids": [3, 4, 5]}] * 2, SamplingParams(max_tokens=20, ignore_eos=True),
                 use_tqdm=False)
    text = (tmp_path / f"prof.{os.getpid()}.txt").read_text()
    assert text.startswith("10 steps in ") and "aten::" in text

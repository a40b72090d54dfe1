"""A real ``blocks serve`` subprocess on the tiny Llama (CPU, fp32) on 127.0.0.1 and a free port."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from blocks.models.check import build_tiny_checkpoint
from tests.engine.conftest import save_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "test-key-" + os.urandom(4).hex()
MAX_MODEL_LEN = 128
MAX_BODY = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    """Child pids of ``pid`` (from /proc)."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def engine_pids(server_pid: int) -> list[int]:
    """The engine process(es) spawned by a server (their command line runs multiprocessing's spawn_main)."""
    pids = []
    for pid in children(server_pid):
        with contextlib.suppress(OSError):
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"spawn_main" in cmd and b"resource_tracker" not in cmd:
                pids.append(pid)
    return pids


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class Server:
    """A running server: ``url``, ``base_url`` (…/v1), ``proc``, ``api_key``, ``model``."""

    def __init__(self, model_path: str, *extra: str, api_key: str | None = None, log_dir: str | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = self.url + "/v1"
        self.api_key = api_key
        self.model = "tiny"
        cmd = [sys.executable, "-m", "blocks.cli", "serve", model_path, "--host", "127.0.0.1", "--port",
               str(self.port), "--device", "cpu", "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN),
               "--kv-cache-memory-bytes", str(8 << 20), "--served-model-name", "tiny", "--uvicorn-log-level",
               "warning", *extra]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "BLOCKS_API_KEY": ""}
        if api_key:
            cmd += ["--api-key", api_key]
        self.log = open(Path(log_dir or model_path) / f"server-{self.port}.log", "w+")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=str(ROOT))
        deadline = time.time() + 150
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.logs()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server did not start: {self.logs()}")

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def logs(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-4000:]

    def metrics(self) -> dict[str, float]:
        """``name{labels}`` -> value, and ``name`` -> value summed over labels."""
        text = httpx.get(self.url + "/metrics", timeout=5).text
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("blocks:"):
                key, value = line.rsplit(" ", 1)
                values[key] = float(value)
                name = key.split("{", 1)[0]
                values[name] = values.get(name, 0.0) + float(value) if name != key else float(value)
        return values

    def stop(self, timeout: float = 30) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


@pytest.fixture(scope="package")
def tiny_model(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("serve_tiny")
    build_tiny_checkpoint("llama3", path)
    save_tiny_tokenizer(path)
    return str(path)


@pytest.fixture(scope="package")
def server(tiny_model):
    """The shared server (API key on). Teardown checks a graceful SIGTERM: exit 0 and no engine left."""
    srv = Server(tiny_model, "--max-request-body-bytes", str(MAX_BODY), api_key=API_KEY)
    engines = engine_pids(srv.proc.pid)
    assert len(engines) == 1, f"expected one engine process, got {engines}"
    yield srv
    code = srv.stop()
    assert code in (0, -signal.SIGTERM), f"server exit code {code}"  # uvicorn re-raises the SIGTERM it caught
    assert "engine stopped" in srv.logs()
    deadline = time.time() + 10
    while alive(engines[0]) and time.time() < deadline:
        time.sleep(0.1)
    assert not alive(engines[0]), "the engine process outlived the server"

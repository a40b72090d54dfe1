"""Tensor parallelism over real ``torch.distributed`` (gloo, two CPU processes): TP=2 logits equal TP=1
to 1e-5 for every model family and greedy tokens are identical; the torchrun path works as two nodes."""

import shutil
import socket
import subprocess

import pytest
import torch
import torch.multiprocessing as mp

from blocks.models.check import FAMILIES, build_tiny_checkpoint
from blocks.models.harness import greedy_generate
from blocks.models.loader import load_model
from blocks.parallel.state import DistConfig, init_tensor_parallel
from tests.parallel.tp_worker import run_rank

PROMPTS = [[3, 1, 4, 1, 5], [9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2]]
MAX_NEW = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for family in sorted(FAMILIES):
        path = tmp_path_factory.mktemp(family)
        build_tiny_checkpoint(family, path)
        out[family] = str(path)
    return out


def _reference(path):
    model = load_model(path, dtype="float32", device="cpu", attn_backend="torch")
    return greedy_generate(model, PROMPTS, MAX_NEW)


def _compare(results, checkpoints):
    for family, path in checkpoints.items():
        ref = _reference(path)
        tokens, logits = results[family]
        assert tokens == ref.tokens, family
        for got, want in zip(logits, ref.logits):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=family)


def test_tp2_equals_tp1_for_every_family(checkpoints, tmp_path):
    out = tmp_path / "rank0.pt"
    port = _free_port()
    mp.start_processes(run_rank, args=(2, port, checkpoints, PROMPTS, MAX_NEW, str(out)), nprocs=2,
                       start_method="spawn", join=True)
    _compare(torch.load(out), checkpoints)


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_torchrun_two_nodes_on_localhost(checkpoints, tmp_path):
    subset = {k: checkpoints[k] for k in ("llama3", "opt-350m")}
    out = tmp_path / "rank0.pt"
    port = _free_port()
    procs = []
    for node in range(2):
        cmd = ["torchrun", "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1", "--master_addr=127.0.0.1",
               f"--master_port={port}", "-m", "tests.parallel.tp_worker", str(out),
               *[f"{k}={v}" for k, v in subset.items()]]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        output, _ = p.communicate(timeout=240)
        assert p.returncode == 0, output[-3000:]
    _compare(torch.load(out), subset)


def test_misconfigurations_fail_clearly():
    with pytest.raises(ValueError, match="tensor_parallel_size=2 but the world has 1"):
        init_tensor_parallel(2, config=DistConfig(rank=0, world_size=1))
    with pytest.raises(ValueError, match="rank must be in"):
        DistConfig(rank=2, world_size=2)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs 2 GPUs"):
            init_tensor_parallel(2, backend="nccl", config=DistConfig(rank=0, world_size=2))

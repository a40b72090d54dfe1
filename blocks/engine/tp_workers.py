"""Tensor-parallel workers: ranks 1..N-1 of the engine, one process each (one GPU each on CUDA).

Rank 0 (the engine's own process) schedules and samples. Every step it broadcasts the step's
:class:`~blocks.engine.step_inputs.StepInputs` as two int64 tensors; each worker rebuilds them and runs
the same forward on its shard of the model (its own KV heads in its own cache); the row-parallel
layers' all-reduce and the LM head's all-gather keep the ranks in lockstep. Workers never sample.

Lifecycle: :class:`TPWorkers` starts the processes (``python -m blocks.engine.tp_workers``), which join the process
group together with rank 0; :meth:`TPWorkers.check_alive` turns a dead worker into a clear error before
rank 0 would block on it; :meth:`TPWorkers.shutdown` sends the stop command and joins (terminating
stragglers), so no process is left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist

from blocks.engine.config import EngineConfig
from blocks.engine.step_inputs import CMD_STEP, CMD_STOP, HEADER_SIZE, StepInputs

__all__ = ["TPWorkers", "broadcast_inputs", "free_port"]


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for the process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def broadcast_inputs(inputs: StepInputs | None, device: torch.device, *, command: int = CMD_STEP) -> StepInputs | None:
    """Rank 0 sends ``inputs`` (or a command); other ranks pass ``None`` and receive them."""
    if dist.get_rank() == 0:
        header, payload = (inputs or StepInputs([], [], [], [], np.zeros((0, 0), np.int32))).to_tensors(command)
        header, payload = header.to(device), payload.to(device)
        dist.broadcast(header, 0)
        dist.broadcast(payload, 0)
        return inputs
    header = torch.empty(HEADER_SIZE, dtype=torch.int64, device=device)
    dist.broadcast(header, 0)
    if int(header[6]) == CMD_STOP:
        return None
    payload = torch.empty(int(header[7]), dtype=torch.int64, device=device)
    dist.broadcast(payload, 0)
    return StepInputs.from_tensors(header, payload)


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this worker when the engine process dies (no orphans, even after a SIGKILL)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker_main(rank: int, world_size: int, port: int, model_path: str, config: dict, parent_pid: int) -> None:
    from blocks.engine.runner import ModelRunner
    from blocks.parallel.state import DistConfig, destroy_tensor_parallel, init_tensor_parallel

    _die_with_parent()
    if os.getppid() != parent_pid:  # the engine died before we could ask for the signal
        return
    if os.environ.get("BLOCKS_TP_DUMP_AFTER"):  # debugging a hang: print every thread's stack, then exit
        import faulthandler

        faulthandler.dump_traceback_later(float(os.environ["BLOCKS_TP_DUMP_AFTER"]), exit=True)
    torch.set_num_threads(1)
    tp = init_tensor_parallel(world_size, config=DistConfig(rank=rank, world_size=world_size, master_port=port))
    runner = ModelRunner(EngineConfig(**config), model_path, sampling_info=None, tp=tp)
    try:
        while True:
            inputs = broadcast_inputs(None, runner.comm_device)
            if inputs is None:
                break
            runner.run_model(inputs)
    finally:
        runner.release_graphs()
        destroy_tensor_parallel()


class TPWorkers:
    """Ranks 1..``world_size - 1`` as child processes (see the module docstring).

    Workers are started with ``subprocess`` (``python -m blocks.engine.tp_workers``, arguments as JSON), so
    an engine that itself runs in a daemonic process (the server's engine core) can start them too.
    """

    def __init__(self, config: EngineConfig, model_path: str, world_size: int) -> None:
        self.port = free_port()
        args = {"world_size": world_size, "port": self.port, "model_path": model_path, "config": asdict(config),
                "parent_pid": os.getpid()}
        self.procs = [
            subprocess.Popen([sys.executable, "-m", "blocks.engine.tp_workers", json.dumps({**args, "rank": rank})])
            for rank in range(1, world_size)
        ]

    def check_alive(self) -> None:
        """Raise ``RuntimeError`` naming the rank if a worker process has exited."""
        for rank, p in enumerate(self.procs, start=1):
            code = p.poll()
            if code is not None:
                raise RuntimeError(
                    f"tensor-parallel worker rank {rank} exited (code {code}); the engine cannot continue"
                )

    def shutdown(self, device: torch.device, *, timeout_s: float = 30.0) -> None:
        """Stop the workers and leave the process group with them, wait for them, kill stragglers.

        The stop command goes first; then rank 0 leaves the group *while* the workers leave it (waiting
        for the workers to exit before leaving deadlocked NCCL's teardown on both sides); see
        :func:`~blocks.parallel.state.destroy_tensor_parallel`. Captured CUDA graphs are released first."""
        from blocks.parallel.state import destroy_tensor_parallel

        alive = all(p.poll() is None for p in self.procs)
        if alive and dist.is_initialized():
            with contextlib.suppress(RuntimeError):
                broadcast_inputs(None, device, command=CMD_STOP)
        destroy_tensor_parallel()
        for p in self.procs:
            try:
                p.wait(timeout_s)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


if __name__ == "__main__":
    _a = json.loads(sys.argv[1])
    _worker_main(_a["rank"], _a["world_size"], _a["port"], _a["model_path"], _a["config"], _a["parent_pid"])

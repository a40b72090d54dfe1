"""Tensor-parallel workers: ranks 1..N-1 of the engine, one process each (one GPU each on CUDA).

Rank 0 (the engine's own process) schedules and samples. Every step it writes the step's
:class:`~blocks.engine.step_inputs.StepInputs` (an int64 header and payload) into a shared-memory ring
(:mod:`blocks.engine.shm_channel`; the workers are local child processes); each worker reads them on the
host (no device sync, no collective), rebuilds them and runs the same forward on its shard of the model
(its own KV heads in its own cache); the row-parallel layers' all-reduce and the LM head's all-gather
(the process group, NCCL or gloo) keep the ranks in lockstep. Workers never sample.

Lifecycle: :class:`TPWorkers` starts the processes (``python -m blocks.engine.tp_workers``, the ring's name in
their arguments), which join the process group together with rank 0. Rank 0 creates the ring once it knows
``max_model_len`` (:meth:`TPWorkers.open_channel`, before its first collective after loading the model); a
worker attaches after its own model load, which ends with that collective. :meth:`TPWorkers.check_alive`
turns a dead worker into a clear error before rank 0 would block on it (also while a send waits for a
worker to free a slot); a worker exits when rank 0 dies (``PR_SET_PDEATHSIG``, and its reads check its
parent). :meth:`TPWorkers.shutdown` sends the stop command through the ring, leaves the group with the
workers and joins them (terminating stragglers), then unlinks the ring, so no process or segment is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
from dataclasses import asdict

import torch

from blocks.engine.config import EngineConfig
from blocks.engine.shm_channel import ShmReader, ShmWriter
from blocks.engine.step_inputs import CMD_STEP, CMD_STOP, H_COMMAND, HEADER_SIZE, StepInputs, message_size

__all__ = ["TPWorkers", "free_port", "max_step_message_bytes"]


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for the process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this worker when the engine process dies (no orphans, even after a SIGKILL)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def max_step_message_bytes(config: EngineConfig, max_model_len: int) -> int:
    """Bytes of the largest :class:`StepInputs` message an engine with this configuration sends.

    Tokens: the scheduler's budget (:meth:`EngineConfig.token_budget`).
    Sequences: at most one per token (beam forks may run more than ``max_num_seqs`` sequences), each with a
    block-table row of ``ceil(max_model_len / block_size)`` blocks. Copy-on-write copies: one per sequence
    (only the partly filled block a sequence writes into is copied). Logits rows: one per sequence (its
    last token) plus one per token (prompt logprobs)."""
    tokens = config.token_budget(max_model_len)
    words = message_size(num_tokens=tokens, num_seqs=tokens, width=-(-max_model_len // config.block_size),
                         num_copies=tokens, num_rows=2 * tokens)
    return 8 * words


def _worker_main(rank: int, world_size: int, port: int, model_path: str, config: dict, parent_pid: int,
                 channel: str) -> None:
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
    # the runner's build ends with a collective that rank 0 joins only after creating the ring
    runner = ModelRunner(EngineConfig(**config), model_path, sampling_info=None, tp=tp)
    reader = ShmReader(channel, rank - 1)
    parent_alive = lambda: os.getppid() == parent_pid
    try:
        while True:
            msg = reader.recv(alive=parent_alive)
            if msg[H_COMMAND] == CMD_STOP:
                break
            runner.run_model(StepInputs.from_arrays(msg[:HEADER_SIZE], msg[HEADER_SIZE:]))
    finally:
        reader.close()
        runner.release_graphs()
        destroy_tensor_parallel()


class TPWorkers:
    """Ranks 1..``world_size - 1`` as child processes and the ring that feeds them (see the module docstring).

    Workers are started with ``subprocess`` (``python -m blocks.engine.tp_workers``, arguments as JSON), so
    an engine that itself runs in a daemonic process (the server's engine core) can start them too.
    """

    def __init__(self, config: EngineConfig, model_path: str, world_size: int) -> None:
        self.config = config
        self.port = free_port()
        self.channel_name = f"blocks_tp_{os.getpid()}_{secrets.token_hex(6)}"
        self.channel: ShmWriter | None = None
        args = {"world_size": world_size, "port": self.port, "model_path": model_path, "config": asdict(config),
                "parent_pid": os.getpid(), "channel": self.channel_name}
        self.procs = [
            subprocess.Popen([sys.executable, "-m", "blocks.engine.tp_workers", json.dumps({**args, "rank": rank})])
            for rank in range(1, world_size)
        ]

    def open_channel(self, max_model_len: int) -> None:
        """Create the shared-memory ring, sized for the largest step (:func:`max_step_message_bytes`).

        Call it before the first collective that follows the model load: workers attach after it."""
        self.channel = ShmWriter(num_readers=len(self.procs), name=self.channel_name,
                                 message_bytes=max_step_message_bytes(self.config, max_model_len))

    def send(self, inputs: StepInputs, *, command: int = CMD_STEP, timeout: float | None = None) -> None:
        """Hand ``inputs`` (or a command) to every worker; raises if a worker died, also while waiting."""
        self.check_alive()
        self.channel.send(*inputs.to_arrays(command), alive=self.check_alive, timeout=timeout)

    def check_alive(self) -> None:
        """Raise ``RuntimeError`` naming the rank if a worker process has exited."""
        for rank, p in enumerate(self.procs, start=1):
            code = p.poll()
            if code is not None:
                raise RuntimeError(
                    f"tensor-parallel worker rank {rank} exited (code {code}); the engine cannot continue"
                )

    def shutdown(self, *, timeout_s: float = 30.0) -> None:
        """Stop the workers and leave the process group with them, wait for them, kill stragglers, unlink
        the ring.

        The stop command goes first (through the ring, if it was created: before that the workers have not
        reached their loop); then rank 0 leaves the group *while* the workers leave it (waiting for the
        workers to exit before leaving deadlocked NCCL's teardown on both sides); see
        :func:`~blocks.parallel.state.destroy_tensor_parallel`. Captured CUDA graphs are released first
        (by the runner)."""
        from blocks.parallel.state import destroy_tensor_parallel

        try:
            if self.channel is not None and all(p.poll() is None for p in self.procs):
                with contextlib.suppress(RuntimeError, TimeoutError):
                    self.send(StepInputs.empty(), command=CMD_STOP, timeout=timeout_s)
            destroy_tensor_parallel()
            for p in self.procs:
                try:
                    p.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
        finally:
            if self.channel is not None:
                self.channel.close()
                self.channel = None


if __name__ == "__main__":
    _a = json.loads(sys.argv[1])
    _worker_main(_a["rank"], _a["world_size"], _a["port"], _a["model_path"], _a["config"], _a["parent_pid"],
                 _a["channel"])

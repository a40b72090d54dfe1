"""The shared-memory ring that carries tensor-parallel step inputs (``blocks.engine.shm_channel``): random
``StepInputs`` of odd sizes round-trip through one writer and 1-3 reader processes, in order, many times
around the ring; oversized messages fail loudly; dead peers and timeouts raise instead of hanging; no
segment is left in /dev/shm (also not by a TP engine), and a reader process neither unlinks nor warns."""

import multiprocessing as mp
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blocks.engine.shm_channel import ShmReader, ShmWriter
from blocks.engine.step_inputs import CMD_STEP, CMD_STOP, H_COMMAND, HEADER_SIZE, StepInputs, message_size

MAX_WIDTH = 300


def _segment(name: str) -> str:
    return f"/dev/shm/{name}"


def _random_inputs(seed: int, i: int) -> StepInputs:
    """Message ``i`` of a deterministic stream: 0, 1 and many tokens, empty copies, wide block tables."""
    rng = np.random.default_rng([seed, i])
    kind = i % 5
    num_seqs = (0, 1, int(rng.integers(2, 9)), int(rng.integers(1, 4)), 64)[kind]
    qlens = [1] if kind == 1 else rng.integers(1, 40, num_seqs).tolist()
    if kind == 4:
        qlens = [1] * num_seqs  # a decode batch
    num_tokens = sum(qlens)
    width = 0 if num_seqs == 0 else (MAX_WIDTH if kind == 3 else int(rng.integers(1, 6)))
    big = 1 << 40
    num_copies = 0 if kind in (0, 1) else int(rng.integers(0, 4))
    return StepInputs(
        token_ids=rng.integers(0, big, num_tokens).tolist(),
        positions=rng.integers(0, big, num_tokens).tolist(),
        query_lens=qlens,
        seq_lens=rng.integers(1, big, num_seqs).tolist(),
        block_tables=rng.integers(-1, 1 << 31, (num_seqs, width)).astype(np.int32),
        copies=[tuple(p) for p in rng.integers(0, big, (num_copies, 2)).tolist()],
        logits_rows=rng.integers(0, max(num_tokens, 1), int(rng.integers(0, num_seqs + 1))).tolist(),
        use_graph=bool(rng.integers(0, 2)),
    )


def _same(a: StepInputs, b: StepInputs) -> bool:
    return (a.token_ids == b.token_ids and a.positions == b.positions and a.query_lens == b.query_lens
            and a.seq_lens == b.seq_lens and a.copies == b.copies and a.logits_rows == b.logits_rows
            and a.use_graph == b.use_graph and np.asarray(a.block_tables).shape == np.asarray(b.block_tables).shape
            and np.array_equal(np.asarray(a.block_tables), np.asarray(b.block_tables)))


def _max_bytes() -> int:  # the stream's largest message plus the index word
    return 8 * (1 + message_size(num_tokens=64 * 40, num_seqs=64, width=MAX_WIDTH, num_copies=4, num_rows=64))


def _reader_proc(name: str, index: int, seed: int, slow: bool, out) -> None:
    """Read until the stop command; report how many messages came and the first errors."""
    errors, n = [], 0
    with ShmReader(name, index) as reader:
        while True:
            msg = reader.recv(timeout=60)
            header, payload = msg[1 : 1 + HEADER_SIZE], msg[1 + HEADER_SIZE :]
            if header[H_COMMAND] == CMD_STOP:
                break
            if int(msg[0]) != n:
                errors.append(f"reader {index}: got message {int(msg[0])}, expected {n}")
            elif not _same(StepInputs.from_arrays(header, payload), _random_inputs(seed, n)):
                errors.append(f"reader {index}: message {n} differs")
            n += 1
            if slow and n % 5 == 0:
                time.sleep(0.01)  # fall behind: the writer must wait for this reader
    out.put((index, n, errors[:5]))


@pytest.mark.parametrize("num_readers", [1, 3])
def test_round_trips_through_reader_processes_in_order(num_readers):
    count, seed, num_slots = 60, num_readers, 3  # wraps the ring 20 times
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with ShmWriter(num_readers=num_readers, message_bytes=_max_bytes(), num_slots=num_slots) as writer:
        procs = [ctx.Process(target=_reader_proc, args=(writer.name, r, seed, r == num_readers - 1, out), daemon=True)
                 for r in range(num_readers)]
        for p in procs:
            p.start()
        try:
            alive = lambda: all(p.is_alive() for p in procs)
            for i in range(count):
                writer.send([i], *_random_inputs(seed, i).to_arrays(), alive=alive, timeout=60)
            writer.send([count], *StepInputs.empty().to_arrays(CMD_STOP), alive=alive, timeout=60)
            results = sorted(out.get(timeout=60) for _ in procs)
        finally:
            for p in procs:
                p.join(30)
                if p.is_alive():
                    p.kill()
        assert results == [(r, count, []) for r in range(num_readers)]
        assert all(p.exitcode == 0 for p in procs)
        assert os.path.exists(_segment(writer.name))  # the readers' exits left it alone
    assert not os.path.exists(_segment(writer.name))


def test_oversized_message_raises_and_writes_nothing():
    with ShmWriter(num_readers=1, message_bytes=64) as writer, ShmReader(writer.name, 0) as reader:
        assert writer.max_message_bytes >= 64
        too_big = np.arange(writer.max_message_bytes // 8 + 1)
        with pytest.raises(ValueError, match=f"{too_big.size * 8} bytes does not fit a slot of "
                                             f"{writer.max_message_bytes} bytes"):
            writer.send(too_big[:3], too_big[3:])
        with pytest.raises(TimeoutError):
            reader.recv(timeout=0.01)  # nothing was published
        writer.send(too_big[:-1])
        assert reader.recv(timeout=1).tolist() == too_big[:-1].tolist()


def test_step_inputs_larger_than_the_ring_raise_a_clear_error():
    inputs = _random_inputs(0, 3)  # a wide table
    header, payload = inputs.to_arrays()
    with ShmWriter(num_readers=2, message_bytes=8 * HEADER_SIZE) as writer, pytest.raises(ValueError, match="bytes"):
        writer.send(header, payload)


def test_writer_waiting_on_a_dead_reader_raises_and_reader_times_out():
    with ShmWriter(num_readers=2, message_bytes=64, num_slots=1) as writer, ShmReader(writer.name, 1) as reader:
        writer.send([1, 2, 3])  # the slot is now taken until both readers consumed it
        assert reader.recv(timeout=1).tolist() == [1, 2, 3]

        def dead():
            raise RuntimeError("worker rank 1 exited")

        with pytest.raises(RuntimeError, match="rank 1 exited"):
            writer.send([4], alive=dead)
        with pytest.raises(RuntimeError, match="died"):
            writer.send([4], alive=lambda: False)
        with pytest.raises(TimeoutError):
            writer.send([4], timeout=0.05)
        with pytest.raises(RuntimeError, match="died"):
            reader.recv(alive=lambda: False)
        with pytest.raises(TimeoutError):
            reader.recv(timeout=0.05)


def test_reader_in_its_own_process_neither_unlinks_nor_warns():
    """A TP worker is a plain subprocess with its own resource tracker: attaching must not register the
    segment there (CPython < 3.13 would unlink it when the worker exits and warn of a leak)."""
    with ShmWriter(num_readers=1, message_bytes=64) as writer:
        writer.send([7, 8])
        code = ("import sys; from blocks.engine.shm_channel import ShmReader\n"
                "r = ShmReader(sys.argv[1], 0); assert r.recv(timeout=10).tolist() == [7, 8]; r.close()")
        done = subprocess.run([sys.executable, "-c", code, writer.name], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "resource_tracker" not in done.stderr and "leaked" not in done.stderr
        assert os.path.exists(_segment(writer.name))
        writer.send([9])  # the reader's count survived its exit: the slot is reusable
    assert not os.path.exists(_segment(writer.name))


def test_close_is_idempotent_and_leaves_no_segment():
    writer = ShmWriter(num_readers=1, message_bytes=1 << 20, num_slots=4)
    reader = ShmReader(writer.name, 0)
    assert os.path.exists(_segment(writer.name))
    with pytest.raises(ValueError, match="reader index 1"):
        ShmReader(writer.name, 1)
    reader.close()
    writer.close()
    writer.close()
    reader.close()
    assert not os.path.exists(_segment(writer.name))


_ints = st.lists(st.integers(-(1 << 62), 1 << 62), max_size=12)


@st.composite
def _step_inputs(draw):
    num_seqs = draw(st.integers(0, 5))
    width = draw(st.integers(0, 6)) if num_seqs else 0
    table = np.array(draw(st.lists(st.integers(-1, (1 << 31) - 1), min_size=num_seqs * width,
                                   max_size=num_seqs * width)), dtype=np.int32).reshape(num_seqs, width)
    tokens = draw(_ints)
    return StepInputs(
        token_ids=tokens, positions=draw(st.lists(st.integers(0, 1 << 40), min_size=len(tokens),
                                                  max_size=len(tokens))),
        query_lens=draw(st.lists(st.integers(0, 99), min_size=num_seqs, max_size=num_seqs)),
        seq_lens=draw(st.lists(st.integers(0, 1 << 40), min_size=num_seqs, max_size=num_seqs)),
        block_tables=table,
        copies=draw(st.lists(st.tuples(st.integers(0, 1 << 40), st.integers(0, 1 << 40)), max_size=4)),
        logits_rows=draw(_ints), use_graph=draw(st.booleans()))


@settings(max_examples=200, deadline=None)
@given(_step_inputs(), st.sampled_from([CMD_STEP, CMD_STOP]))
def test_to_arrays_from_arrays_round_trip(inputs, command):
    header, payload = inputs.to_arrays(command)
    assert header.dtype == payload.dtype == np.int64 and header.shape == (HEADER_SIZE,)
    assert header[H_COMMAND] == command
    assert HEADER_SIZE + payload.size == message_size(
        num_tokens=len(inputs.token_ids), num_seqs=len(inputs.seq_lens), width=inputs.block_tables.shape[1],
        num_copies=len(inputs.copies), num_rows=len(inputs.logits_rows))
    assert _same(StepInputs.from_arrays(header, payload), inputs)
    with pytest.raises(ValueError, match="expects a payload"):
        StepInputs.from_arrays(header, np.append(payload, 0))


def test_tp_engine_leaves_no_segment(tmp_path):
    from blocks import LLM, SamplingParams
    from blocks.models.check import build_tiny_checkpoint

    build_tiny_checkpoint("llama3", tmp_path)
    llm = LLM(str(tmp_path), tensor_parallel_size=2, skip_tokenizer_init=True, dtype="float32", device="cpu")
    try:
        workers = llm.engine.runner.workers
        name = workers.channel.name
        assert os.path.exists(_segment(name))
        params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
        assert len(llm.generate({"prompt_token_ids": [1, 2, 3]}, params, use_tqdm=False)[0].outputs[0].token_ids) == 3
    finally:
        llm.shutdown()
    assert all(p.poll() == 0 for p in workers.procs)  # they left through the stop command
    assert not os.path.exists(_segment(name))


def test_token_budget_is_the_one_rule_for_scheduler_ring_and_profile():
    """The scheduler, the TP ring and the KV-sizing profile forward read the step's token budget from
    EngineConfig.token_budget: without chunked prefill a whole prompt must fit one step."""
    from blocks.engine.config import EngineConfig
    from blocks.engine.tp_workers import max_step_message_bytes

    assert EngineConfig().token_budget(32768) == 8192
    assert EngineConfig(enable_chunked_prefill=False).token_budget(32768) == 32768
    assert EngineConfig(enable_chunked_prefill=False).token_budget(1024) == 8192
    assert EngineConfig(max_num_batched_tokens=300).token_budget(32768) == 300
    small, big = (max_step_message_bytes(EngineConfig(enable_chunked_prefill=c), 32768) for c in (True, False))
    assert big > 3 * small  # the ring grows with the budget

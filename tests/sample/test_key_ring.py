"""The pinned key slots of the Triton sampler (``blocks.sample.key_ring``)."""

import pytest
import torch

from blocks.sample.key_ring import GROUP, KeyRing

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pinned memory, events)")


@cuda
@pytest.mark.gpu
def test_slots_rotate_and_a_reused_slot_waits_for_its_kernels():
    ring = KeyRing(16, groups=2)
    seen = []
    for step in range(3 * 2 * GROUP):
        keys = ring.acquire(10)
        assert keys.is_pinned() and keys.shape == (10,)
        keys.fill_(step)
        seen.append(keys.data_ptr())
        if step == 0:  # a kernel that reads slot 0 late: the ring must not hand slot 0 out before it ran
            torch.cuda._sleep(50_000_000)
            copy = keys.to("cuda", non_blocking=True)
        ring.release()
    assert len(set(seen)) == 2 * GROUP and seen[: 2 * GROUP] == seen[2 * GROUP : 4 * GROUP]
    assert int(copy[0]) == 0  # read before the slot was refilled at step 2 * GROUP
    with pytest.raises(ValueError, match="capacity"):
        ring.acquire(17)
    with pytest.raises(RuntimeError, match="without acquire"):
        ring.release()


@cuda
@pytest.mark.gpu
def test_a_refused_launch_leaves_the_sampler_usable():
    """A step whose kernel launch is refused (a bad option) releases its key slot: the next step samples."""
    from blocks.sample.sampler import Sampler
    from tests.sample.helpers import mixed_batch

    batch, _, _ = mixed_batch(6, 100, seed=3, device="cuda", allow_greedy=False)
    logits = torch.randn(6, 100, device="cuda")
    sampler = Sampler(backend="triton", seed=0, triton_options={"max_rounds": -1})
    with pytest.raises(ValueError, match="max_rounds"):
        sampler(logits, batch)
    sampler.triton_options = {}
    ids = sampler(logits, batch).sampled_token_ids
    assert ids.shape == (6,) and bool(((ids >= 0) & (ids < 100)).all())

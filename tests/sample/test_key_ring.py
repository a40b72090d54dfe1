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

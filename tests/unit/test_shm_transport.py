"""Shared-memory transport: tensors written by one mapping are read intact through another.

Every segment a test creates is named with a prefix of its own and unlinked by the `prefix`
fixture; the module-level fixture then checks that no segment named after this process is left.
"""
import os
import stat
import subprocess
import sys

import pytest
import torch

from dfuse.engine.protocol import OutputSlot, TensorRef
from dfuse.engine.transport import shm_files
from dfuse.engine.transport.base import ALIGN, SlotOverflowError, SlotWriter, byte_view
from dfuse.engine.transport.endpoint import Endpoint
from dfuse.engine.transport.shm import Segment
from dfuse.engine.transport.slots import SlotPool
from dfuse.engine.transport.shm_files import list_segments, new_segment_prefix, sweep_stale_segments, unlink_segments

pytestmark = pytest.mark.skipif(not os.path.isdir(shm_files.SHM_DIR), reason="needs /dev/shm")

OURS = f"{shm_files.PREFIX}{os.getpid()}_"  # every segment named after this process


@pytest.fixture(scope="module", autouse=True)
def nothing_left_behind():
    before = set(list_segments(OURS))
    yield
    assert set(list_segments(OURS)) <= before, "a test left a segment in /dev/shm"


@pytest.fixture
def prefix():
    prefix = new_segment_prefix()
    yield prefix
    unlink_segments(prefix)


def _pool(prefix, slot_bytes=1 << 16, n_slots=3):
    return SlotPool.create_host(prefix + "w0", slot_bytes, n_slots)


def write_tensors(segment, slot, tensors):
    """What a producing worker does: put its outputs into the reserved slot."""
    return SlotWriter(lambda _pool, offset, shape, dtype: byte_view(segment.data, offset, shape, dtype), slot).put_all(tensors)


def read_tensors(refs, endpoint):
    """What a consuming worker does: map the referenced tensors (its own mapping)."""
    return endpoint.fetch(0, refs)


def SegmentCache():  # noqa: N802  (a consumer's endpoint maps each pool once)
    return Endpoint(torch.device("cpu"))


def _tensors(generator):
    return {
        "f32": torch.randn(3, 5, 7, generator=generator),
        "bf16": torch.randn(2, 77, 9, generator=generator).to(torch.bfloat16),
        "f16": torch.randn(13, generator=generator).to(torch.float16),
        "u8": torch.randint(0, 256, (1, 4, 6, 3), generator=generator, dtype=torch.uint8),
        "scalar": torch.tensor(3.25),
        "odd": torch.randint(0, 256, (1,), generator=generator, dtype=torch.uint8),
        "f32_after_odd": torch.randn(4, 4, generator=generator),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.uint8])
@pytest.mark.parametrize("shape", [(), (1,), (5,), (3, 17), (2, 3, 4, 5)])
def test_one_tensor_round_trip_through_a_second_mapping(prefix, dtype, shape):
    pool = _pool(prefix)
    slot = pool.acquire(request_id=1)
    source = (torch.arange(max(1, torch.Size(shape).numel())) * 3 % 251).reshape(shape).to(dtype)
    refs = write_tensors(pool.segment, slot, {"x": source})

    received = read_tensors(refs, SegmentCache())["x"]
    assert received.dtype == dtype and received.shape == source.shape
    assert torch.equal(received, source)


def test_many_tensors_round_trip_packed_and_aligned(prefix):
    pool = _pool(prefix)
    pool.acquire(request_id=0)
    slot = pool.acquire(request_id=1)  # slot 1: a non-zero base offset
    tensors = _tensors(torch.Generator().manual_seed(0))
    refs = write_tensors(pool.segment, slot, tensors)

    assert [r.name for r in refs] == list(tensors)
    spans = []
    for ref, tensor in zip(refs, tensors.values()):
        assert ref.pool == pool.segment.name
        assert ref.offset % ALIGN == 0
        spans.append((ref.offset, ref.offset + tensor.numel() * tensor.element_size()))
    assert spans[0][0] == slot.offset  # packed from the start of the slot
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert end <= start < end + ALIGN  # no overlap, no more padding than the alignment
    assert spans[-1][1] <= slot.offset + slot.nbytes

    received = read_tensors(refs, SegmentCache())
    assert received.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert received[name].dtype == tensor.dtype and torch.equal(received[name], tensor), name


def test_non_contiguous_input_is_written_in_logical_order(prefix):
    pool = _pool(prefix)
    source = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    refs = write_tensors(pool.segment, pool.acquire(1), {"t": source})
    assert torch.equal(read_tensors(refs, SegmentCache())["t"], source)


def test_reader_maps_the_same_pages_not_a_copy(prefix):
    pool = _pool(prefix)
    slot = pool.acquire(1)
    refs = write_tensors(pool.segment, slot, {"x": torch.zeros(4)})
    view = read_tensors(refs, SegmentCache())["x"]
    write_tensors(pool.segment, slot, {"x": torch.full((4,), 7.0)})
    assert torch.equal(view, torch.full((4,), 7.0))


def test_writing_one_slot_leaves_its_neighbours_intact(prefix):
    pool = _pool(prefix, slot_bytes=4096, n_slots=3)
    slots = [pool.acquire(i) for i in range(3)]
    first = write_tensors(pool.segment, slots[0], {"x": torch.full((1024,), 1.0)})
    last = write_tensors(pool.segment, slots[2], {"x": torch.full((1024,), 3.0)})
    write_tensors(pool.segment, slots[1], {"x": torch.full((1024,), 2.0)})  # fills slot 1 exactly
    cache = SegmentCache()
    assert torch.equal(read_tensors(first, cache)["x"], torch.full((1024,), 1.0))
    assert torch.equal(read_tensors(last, cache)["x"], torch.full((1024,), 3.0))


def test_outputs_larger_than_the_slot_raise_slot_overflow(prefix):
    pool = _pool(prefix, slot_bytes=4096, n_slots=2)
    slot = pool.acquire(1)
    with pytest.raises(SlotOverflowError, match="slot_mib") as info:
        write_tensors(pool.segment, slot, {"big": torch.zeros(1025, dtype=torch.float32)})
    assert isinstance(info.value, ValueError)
    # Alignment padding counts: two 1-byte tensors need 65 bytes of a 64-byte slot.
    tight = OutputSlot(pool.segment.name, 0, ALIGN)
    one = torch.ones(1, dtype=torch.uint8)
    with pytest.raises(SlotOverflowError, match="slot_mib"):
        write_tensors(pool.segment, tight, {"a": one, "b": one})
    # The next slot was not touched by the failed writes.
    assert int(pool.segment.data[4096:].sum()) == 0


def test_view_outside_the_segment_and_unknown_dtype_raise_value_error(prefix):
    pool = _pool(prefix, slot_bytes=4096, n_slots=1)
    with pytest.raises(ValueError, match="outside its pool"):
        byte_view(pool.segment.data, 4096 - 4, (2,), torch.float32)
    with pytest.raises(ValueError, match="outside its pool"):
        byte_view(pool.segment.data, -64, (1,), torch.uint8)
    ref = write_tensors(pool.segment, pool.acquire(1), {"x": torch.zeros(2)})[0]
    bad = TensorRef(ref.name, ref.pool, ref.offset, ref.shape, "complex64")
    with pytest.raises(ValueError, match="unsupported tensor dtype"):
        read_tensors([bad], SegmentCache())


def test_slot_pool_credits(prefix):
    pool = _pool(prefix, slot_bytes=4096, n_slots=3)
    assert pool.free == 3
    a, b, c = pool.acquire(10), pool.acquire(11), pool.acquire(10)
    assert sorted(s.offset for s in (a, b, c)) == [0, 4096, 8192]
    assert all(s.nbytes == 4096 and s.pool == pool.segment.name for s in (a, b, c))
    assert pool.acquire(12) is None  # back-pressure: every slot is taken
    assert pool.free == 0

    pool.release(b.offset, 11)
    assert pool.free == 1
    again = pool.acquire(12)
    assert again.offset == b.offset  # exactly the released slot comes back
    assert pool.acquire(13) is None

    pool.release(a.offset, 10)
    pool.release(c.offset, 10)  # request 10 held two slots
    assert pool.free == 2
    assert sorted(pool.acquire(14).offset for _ in range(2)) == sorted([a.offset, c.offset])
    assert pool.acquire(15) is None


def test_a_release_by_another_request_is_refused(prefix):
    """A double release (a bug) must not free a slot that another request now reads."""
    pool = _pool(prefix, slot_bytes=4096, n_slots=1)
    slot = pool.acquire(1)
    pool.release(slot.offset, 1)
    assert pool.acquire(2).offset == slot.offset  # request 2 now reads it
    pool.release(slot.offset, 1)  # request 1 releases again: refused
    assert pool.free == 0 and pool.acquire(3) is None


def test_segment_files_are_private_to_the_user(prefix):
    pool = _pool(prefix)
    mode = stat.S_IMODE(os.stat(os.path.join(shm_files.SHM_DIR, pool.segment.name)).st_mode)
    assert mode == 0o600


def test_creating_an_existing_segment_fails_instead_of_sharing_it(prefix):
    Segment(prefix + "w0", 4096, create=True)
    with pytest.raises(FileExistsError):
        Segment(prefix + "w0", 4096, create=True)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(timeout=30)
    return child.pid


def test_sweep_removes_segments_of_dead_engines_only(prefix):
    pid = _dead_pid()
    if shm_files._pid_alive(pid):  # pragma: no cover - the pid was reused at once
        pytest.skip(f"pid {pid} was reused")
    dead = f"{shm_files.PREFIX}{pid}_{os.urandom(4).hex()}_w0"
    live = prefix + "w0"  # named after this (live) process
    try:
        Segment(dead, 4096, create=True)
        Segment(live, 4096, create=True)
        swept = sweep_stale_segments()
        assert not os.path.exists(os.path.join(shm_files.SHM_DIR, dead))
        assert os.path.exists(os.path.join(shm_files.SHM_DIR, live))
        assert live not in swept
    finally:
        shm_files.unlink_segment(dead)


def test_unlink_segments_removes_only_matching_names(prefix):
    other = new_segment_prefix()
    try:
        for name in (prefix + "w0", prefix + "w1", other + "w0"):
            Segment(name, 4096, create=True)
        unlink_segments(prefix)
        assert list_segments(prefix) == []
        assert list_segments(other) == [other + "w0"]
    finally:
        unlink_segments(other)


def test_endpoint_maps_each_segment_once(prefix):
    pool = _pool(prefix)
    endpoint = Endpoint(torch.device("cpu"))
    assert endpoint._buffer(pool.segment.name).data_ptr() == endpoint._buffer(pool.segment.name).data_ptr()


@pytest.mark.parametrize(
    "name",
    ["../etc/passwd", "../etc", "dfuse_/../../etc/passwd", "/dev/shm/dfuse_1_x_w0", "sem.other", "", "dfuse"],
)
def test_segments_reject_names_that_are_not_dfuse_segments(name):
    with pytest.raises(ValueError, match="not a dfuse segment name"):
        Segment(name)

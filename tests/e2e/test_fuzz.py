"""Hostile bytes never hurt: a stage worker fed random and mangled frames drops them and still
serves a valid task; the engine's result socket shrugs off garbage and forged worker ids; control
sockets and shared memory are owner-only."""

import os
import random
import stat

import msgspec
import pytest
import torch
import zmq

from dfuse import Engine
from dfuse.engine import protocol as wire
from dfuse.engine.transport.base import byte_view
from dfuse.engine.transport.slots import SlotPool
from dfuse.engine.transport.shm_files import list_segments

from fake_engine import MODEL, WORKER_ID, FakeEngine
from process_utils import alive

FUZZ_SEED = 20240607
VALID_REQUEST_ID = 10**6
LATENTS = (1, 16, 8, 8)  # a 64x64 image's latents
SLOT_BYTES = 2**20


@pytest.fixture
def decoder_worker(monkeypatch):
    monkeypatch.setenv("DFUSE_LOG", "ERROR")  # the worker would log one line per dropped frame
    fake = FakeEngine("decoder")
    try:
        ready = fake.receive(120)
        assert isinstance(ready, wire.Ready) and ready.worker_id == WORKER_ID, ready
        yield fake
    finally:
        fake.close()
    assert list_segments(fake.prefix) == [] and not alive(fake.process.pid)


def _latents_task(fake: FakeEngine, value: int) -> tuple[wire.StageTask, SlotPool]:
    """A valid decoder task: latents filled with `value` in a host slot, an output slot beside it."""
    inputs = SlotPool.create_host(f"{fake.prefix}latents", SLOT_BYTES, 1)
    outputs = SlotPool.create_host(f"{fake.prefix}pixels", SLOT_BYTES, 1)
    byte_view(inputs.segment.data, 0, LATENTS, torch.float32).fill_(float(value))
    task = wire.StageTask(
        VALID_REQUEST_ID, wire.RequestParams("fuzz", None, 4, 1.0, 64, 64, value),
        [wire.TensorRef("latents", inputs.name, 0, LATENTS, "float32")],
        outputs.acquire(VALID_REQUEST_ID),
    )
    return task, outputs


def _expect_image(fake: FakeEngine, outputs: SlotPool, value: int) -> int:
    """Wait for the valid task's answer; return how many other answers came before it."""
    others = 0
    while True:
        message = fake.receive(60)
        assert message is not None, f"the worker stopped answering (exit code {fake.process.exitcode})"
        if getattr(message, "request_id", None) == VALID_REQUEST_ID:
            break
        others += 1
    assert isinstance(message, wire.StageDone), message
    (ref,) = message.outputs
    assert (ref.name, ref.pool, tuple(ref.shape), ref.dtype) == ("image", outputs.name, (1, 64, 64, 3), "uint8")
    pixels = byte_view(outputs.segment.data, ref.offset, tuple(ref.shape), torch.uint8).numpy()
    assert (pixels == value).all()
    return others


def _mangled_frames(rng: random.Random, prefix: str) -> list[bytes]:
    """~500 random byte strings, plus every truncation and 300 mutations of valid messages."""
    frames = [rng.randbytes(rng.choice([0, 1, 2, 5, 17, 64, 300, 4096])) for _ in range(500)]
    frames += [bytes([b]) for b in (0x90, 0x91, 0xC0, 0xC1, 0xDC, 0xDD, 0xFF)]  # lone msgpack headers
    frames.append(b"\x91" * 100_000)  # deeply nested arrays
    frames.append(wire.encode(wire.Ready(WORKER_ID, 1, 0.0)))  # valid msgpack, wrong direction
    task = wire.encode(wire.StageTask(
        1, wire.RequestParams("fuzz", "neg", 4, 1.0, 64, 64, 3),
        [wire.TensorRef("latents", f"{prefix}void-in", 0, LATENTS, "float32")],
        wire.OutputSlot(f"{prefix}void-out", 0, SLOT_BYTES),
    ))
    pool = wire.encode(wire.OpenPool(wire.PoolInfo(
        "p", "GPU-0", SLOT_BYTES, 1, wire.CudaIpcHandle(0, b"h" * 64, SLOT_BYTES, 0, b"r", 0, b"e", True), [b"x"],
    )))
    for valid in (task, pool):
        frames += [valid[:n] for n in range(len(valid))]
        for _ in range(100):
            mutated = bytearray(valid)
            for _ in range(rng.randint(1, 4)):
                op, at = rng.random(), rng.randrange(len(mutated))
                if op < 0.6:
                    mutated[at] = rng.randrange(256)
                elif op < 0.8:
                    mutated.insert(at, rng.randrange(256))
                elif len(mutated) > 1:
                    del mutated[at]
            frames.append(bytes(mutated))
    return frames


def _still_a_message(frame: bytes):
    try:
        return wire.worker_decoder.decode(frame)
    except msgspec.MsgspecError:
        return None


def test_worker_drops_random_and_mangled_frames_and_still_serves(decoder_worker):
    fake = decoder_worker
    rng = random.Random(FUZZ_SEED)
    print(f"fuzz seed {FUZZ_SEED}")
    sent, tasks = 0, 0
    for frame in _mangled_frames(rng, fake.prefix):
        message = _still_a_message(frame)
        # A mutation that still decodes is a valid message: OpenPool is covered below; tasks run
        # (the engine validated params before, so keep only small, harmless ones) and each must
        # be answered.
        if isinstance(message, wire.OpenPool):
            continue
        if isinstance(message, wire.StageTask):
            p = message.params
            if p.prompt.startswith(("crash:", "oom:")) or not (0 < p.height * p.width <= 2**20):
                continue
            tasks += 1
        fake.send(frame)
        sent += 1
    print(f"sent {sent} frames, {tasks} of them still decodable tasks")
    task, outputs = _latents_task(fake, 123)
    fake.send(wire.encode(task))
    # Every decodable task was answered (done or failed), every other frame dropped silently.
    assert _expect_image(fake, outputs, 123) == tasks
    assert fake.process.exitcode is None


def test_worker_survives_a_pool_announcement_it_cannot_open(decoder_worker):
    fake = decoder_worker
    bogus = wire.OpenPool(wire.PoolInfo(
        f"{fake.prefix}gpu", "GPU-00000000-0000-0000-0000-000000000000", SLOT_BYTES, 1,
        wire.CudaIpcHandle(0, b"\0" * 64, SLOT_BYTES, 0, b"\0" * 64, 0, b"\0" * 64, True), [b"\0" * 64],
    ))
    fake.send(wire.encode(bogus))
    task, outputs = _latents_task(fake, 77)
    fake.send(wire.encode(task))
    _expect_image(fake, outputs, 77)
    assert fake.process.exitcode is None


# --- the engine's side ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine():
    with Engine(model=MODEL, cpu_threads=1) as engine:
        yield engine


def _serve(engine, seeds):
    futures = [engine.submit("fuzzed engine", seed=s) for s in seeds]
    return [f.result(timeout=60).images[0].getpixel((0, 0))[0] for f in futures]


def test_engine_drops_garbage_and_forged_worker_messages(engine):
    rng = random.Random(FUZZ_SEED + 1)
    print(f"fuzz seed {FUZZ_SEED + 1}")
    before = {w.id: (w.pid, w.restarts) for w in engine.stats().workers}
    known = sorted(before)
    timings = wire.StageTimings(0.0, 0.0)
    forged = [
        # Claiming worker ids that do not exist.
        wire.Ready(99, 1, 0.0), wire.Ready(-1, 1, 0.0), wire.LoadFailed(99, "forged"),
        wire.LoadFailed(2**63 - 1, "forged"), wire.StageDone(1000, 0, [], timings),
        wire.StageFailed(-5, 0, "forged"), wire.Progress(12345, 0, 1, 2),
        # Real worker ids, requests they do not hold.
        *(wire.StageDone(w, 10**9 + w, [], timings) for w in known),
        *(wire.StageFailed(w, 10**9 + w, "forged") for w in known),
        *(wire.Progress(w, 10**9 + w, 1, 1) for w in known),
    ]
    frames = [wire.encode(m) for m in forged]
    frames += [rng.randbytes(rng.choice([0, 1, 3, 32, 512])) for _ in range(300)]
    ready = wire.encode(wire.Ready(99, 1, 0.0))
    frames += [ready[:n] for n in range(len(ready))]
    rng.shuffle(frames)

    context = zmq.Context()
    peer = context.socket(zmq.PUSH)
    peer.setsockopt(zmq.LINGER, 1000)
    peer.connect(f"ipc://{engine.host_names[1]}/results")
    try:
        for i in range(0, len(frames), 50):  # garbage interleaved with real traffic
            for frame in frames[i:i + 50]:
                peer.send(frame)
            assert _serve(engine, [i, i + 1]) == [i % 251, (i + 1) % 251]
    finally:
        peer.close()
        context.term()
    assert _serve(engine, range(300, 310)) == [s % 251 for s in range(300, 310)]
    stats = engine.stats()
    assert {w.id: (w.pid, w.restarts) for w in stats.workers} == before
    assert stats.failed == 0


def test_control_sockets_and_segments_are_owner_only(engine):
    run_dir = engine.host_names[1]
    info = os.stat(run_dir)
    assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.getuid()
    assert os.path.basename(run_dir).startswith("dfuse-") and len(os.path.basename(run_dir)) > len("dfuse-") + 4
    sockets = os.listdir(run_dir)
    assert "results" in sockets
    segments = list_segments(engine.host_names[0])
    assert len(segments) == len(engine.stats().workers)  # one slot pool per worker
    for name in segments:
        info = os.stat(os.path.join("/dev/shm", name))
        assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == os.getuid(), name
    assert all(stat.S_ISSOCK(os.stat(os.path.join(run_dir, s)).st_mode) for s in sockets)

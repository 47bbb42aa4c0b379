"""Wire messages: every message survives encode/decode, receivers accept only their own union,
garbage frames are rejected as msgspec errors, and nothing on the wire is pickled."""
import inspect
import io
import pathlib
import tokenize

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dfuse.engine import protocol as wire

REPO = pathlib.Path(wire.__file__).resolve().parents[1]

_params = wire.RequestParams("a red fox", None, 28, 7.0, 1024, 768, 2**63 - 1)
_ref = wire.TensorRef("prompt_embeds", "dfuse_1_ab_w0", 64, (2, 333, 4096), "bfloat16")
_slot = wire.OutputSlot("dfuse_1_ab_w1", 2**24, 2**24)
_pool = wire.PoolInfo(
    "dfuse_1_ab_w1", "GPU-8f1c2d3e-0000-1111-2222-333344445555", 2**24, 3,
    wire.CudaIpcHandle(0, b"\x00\xffipc-handle", 3 * 2**24, 0, b"/torch_1_ref", 8, b"\x01event", True),
    [b"\x02e0", b"\x02e1", b"\x02e2"],
)

TO_WORKER = [
    wire.StageTask(0, _params, [], _slot),
    wire.StageTask(7, wire.RequestParams("", "blurry", 1, 0.0, 16, 16, 0), [_ref, _ref], _slot, report_progress=True),
    wire.StageTask(8, wire.RequestParams("a fox", "blurry", 2, 3.5, 64, 64, 1, true_cfg_scale=4.0), [], _slot),
    wire.StageBatch([wire.StageTask(0, _params, [_ref], _slot), wire.StageTask(1, _params, [], _slot, report_progress=True)]),
    wire.OpenPool(_pool),
    wire.ClosePool("dfuse_1_ab_w4"),
    wire.RemotePool("dfuse_9_cd_w2", "tcp://10.0.0.7:41234"),
    wire.Become("decoder"),
    wire.CancelTask(12),
]
TO_ENGINE = [
    wire.Ready(3, 12345, 1.5),
    wire.Ready(4, 12346, 2.0, _pool),
    wire.Ready(5, 12347, 1.0, None, "tcp://10.0.0.7:40001", 3),
    wire.LoadFailed(2, "OSError: no such file"),
    wire.StageDone(1, 9, [_ref], wire.StageTimings(0.001, 2.5)),
    wire.StageDone(1, 10, [], wire.StageTimings(0.0, 0.0)),
    wire.StageDone(1, 11, [_ref], wire.StageTimings(0.002, 1.5, batch_size=4)),
    wire.StageDone(1, 12, [_ref], wire.StageTimings(0.002, 1.5), warnings=["the prompt is longer than CLIP's 77 tokens"]),
    wire.StageFailed(4, 11, "RuntimeError: boom \u2603"),
    wire.Progress(1, 9, 3, 28),
    wire.StageDone(1, 12, [_ref], wire.StageTimings(0.001, 2.5, fetch_s=0.0004)),
    wire.Heartbeat(2, 0.0),
    wire.Heartbeat(3, 12.5),
    wire.WorkerLog(4, 30, "dfuse.worker: could not open pool p1"),
]


def test_every_message_type_is_covered_here():
    structs = {
        obj for _, obj in inspect.getmembers(wire, inspect.isclass)
        if issubclass(obj, msgspec.Struct) and obj.__module__ == wire.__name__
    }
    top_level = {type(m) for m in TO_WORKER + TO_ENGINE}
    nested = {wire.RequestParams, wire.TensorRef, wire.OutputSlot, wire.StageTimings, wire.PoolInfo, wire.CudaIpcHandle}
    assert structs == top_level | nested | {wire.WorkerSpec}  # the spec goes in on a worker's stdin, once
    assert top_level == set(wire.ToWorker.__args__) | set(wire.ToEngine.__args__)


def test_a_worker_spec_round_trips_and_a_bad_one_is_refused():
    spec = wire.WorkerSpec(3, "dit", "/models/x", "cuda:1", "bfloat16", 2, "ipc:///r/w3", "ipc:///r/results", 42,
                           "dfuse_42_ab", "/r", gpu_pool=("pool", 1 << 20, 4), cpus=(2, 3))
    assert wire.decode_spec(wire.encode_spec(spec)) == spec
    with pytest.raises(msgspec.ValidationError):
        wire.decode_spec(wire.encode_spec(spec).replace(b'"dit"', b'7'))


@pytest.mark.parametrize("message", TO_WORKER, ids=lambda m: type(m).__name__)
def test_worker_bound_messages_round_trip(message):
    decoded = wire.worker_decoder.decode(wire.encode(message))
    assert type(decoded) is type(message) and decoded == message


@pytest.mark.parametrize("message", TO_ENGINE, ids=lambda m: type(m).__name__)
def test_engine_bound_messages_round_trip(message):
    decoded = wire.engine_decoder.decode(wire.encode(message))
    assert type(decoded) is type(message) and decoded == message


def test_tuple_shape_and_large_ints_survive():
    done = wire.engine_decoder.decode(wire.encode(next(m for m in TO_ENGINE if isinstance(m, wire.StageDone))))
    assert done.outputs[0].shape == (2, 333, 4096) and isinstance(done.outputs[0].shape, tuple)
    task = wire.worker_decoder.decode(wire.encode(TO_WORKER[0]))
    assert task.params.seed == 2**63 - 1


@pytest.mark.parametrize("message", TO_ENGINE, ids=lambda m: type(m).__name__)
def test_worker_decoder_rejects_engine_bound_messages(message):
    with pytest.raises(msgspec.ValidationError):
        wire.worker_decoder.decode(wire.encode(message))


@pytest.mark.parametrize("message", TO_WORKER, ids=lambda m: type(m).__name__)
def test_engine_decoder_rejects_worker_bound_messages(message):
    with pytest.raises(msgspec.ValidationError):
        wire.engine_decoder.decode(wire.encode(message))


def test_wrong_field_types_and_extra_fields_are_rejected():
    enc = msgspec.msgpack.encode
    with pytest.raises(msgspec.ValidationError):  # step as a string
        wire.engine_decoder.decode(enc(["Progress", 1, 9, "3", 28]))
    with pytest.raises(msgspec.ValidationError):  # one field too many
        wire.engine_decoder.decode(enc(["Progress", 1, 9, 3, 28, 0]))
    with pytest.raises(msgspec.ValidationError):  # unknown tag
        wire.worker_decoder.decode(enc(["Exec", "import os"]))


# A msgpack string holding invalid UTF-8, where the decoders expect a tag and where they expect
# a str field (LoadFailed.error): "\x80" cannot start a UTF-8 character.
INVALID_UTF8_FRAMES = [b"\x91\xa1\x80", b"\x93\xaaLoadFailed\x01\xa2a\x80", b"\x93\xaaLoadFailed\x01\xa1\xff"]


# msgspec raises UnicodeDecodeError for invalid UTF-8; protocol.py turns it into a DecodeError.
_TOLERATED = msgspec.MsgspecError


@pytest.mark.parametrize("frame", INVALID_UTF8_FRAMES)
def test_invalid_utf8_is_a_msgspec_error(frame):
    for decoder in (wire.worker_decoder, wire.engine_decoder):
        with pytest.raises(msgspec.MsgspecError):
            decoder.decode(frame)


def _decodes_or_msgspec_error(frame: bytes) -> None:
    for decoder, accepted in ((wire.worker_decoder, wire.ToWorker), (wire.engine_decoder, wire.ToEngine)):
        try:
            message = decoder.decode(frame)
        except _TOLERATED:
            continue
        assert isinstance(message, accepted.__args__)


_FUZZ = settings(max_examples=300, database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_FUZZ
@given(st.binary(max_size=256))
def test_random_bytes_raise_only_msgspec_errors(frame):
    _decodes_or_msgspec_error(frame)


_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(), st.text(max_size=8), st.binary(max_size=8)
)
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4), max_leaves=6)
_tags = st.sampled_from([cls.__name__ for cls in (*wire.ToWorker.__args__, *wire.ToEngine.__args__)])


@settings(_FUZZ, max_examples=150)
@given(_tags, st.lists(_values, max_size=7))
def test_well_formed_msgpack_with_real_tags_raises_only_msgspec_errors(tag, fields):
    _decodes_or_msgspec_error(msgspec.msgpack.encode([tag, *fields]))


@_FUZZ
@given(st.sampled_from(TO_WORKER + TO_ENGINE), st.data())
def test_corrupted_real_frames_raise_only_msgspec_errors(message, data):
    frame = bytearray(wire.encode(message))
    for _ in range(data.draw(st.integers(1, 4))):
        frame[data.draw(st.integers(0, len(frame) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(frame)))
    _decodes_or_msgspec_error(bytes(frame[:cut]))


_PICKLE_NAMES = {"pickle", "cPickle", "cloudpickle", "dill", "recv_pyobj", "send_pyobj"}


def _wire_sources():
    files = [REPO / "cli.py"]
    for folder in ("engine", "stages", "scheduler"):
        files += sorted((REPO / folder).rglob("*.py"))
    return files


def test_no_pickle_on_the_wire():
    """Scans code tokens only: docstrings and comments may say "pickle" (protocol.py does)."""
    files = _wire_sources()
    assert REPO / "engine" / "protocol.py" in files and REPO / "stages" / "worker.py" in files
    found = []
    for path in files:
        source = path.read_text()
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type == tokenize.NAME and token.string in _PICKLE_NAMES:
                found.append(f"{path.relative_to(REPO)}:{token.start[0]}: {token.line.strip()}")
    assert not found, "pickle on the wire:\n" + "\n".join(found)

"""The cross-node tensor link (engine/transport/tcp.py) on loopback: what a consumer reads is what
the producer wrote; a request without the engine's secret gets nothing."""

import msgspec
import pytest
import torch
import zmq

from dfuse.engine.transport.tcp import FrameSigner, ReadRequest, SlotClient, SlotServer, new_secret


@pytest.fixture
def context():
    context = zmq.Context()
    yield context
    context.term()


@pytest.fixture
def served(context):
    pool = torch.arange(4096, dtype=torch.int32).view(torch.uint8)  # 16 KiB of known bytes
    signer = FrameSigner(new_secret())
    server = SlotServer(context, "127.0.0.1", signer, {"p0": pool}.get)
    yield server, signer, pool
    server.close()


def test_a_read_returns_the_producers_bytes(context, served):
    server, signer, pool = served
    client = SlotClient(context, signer)
    try:
        got = client.read(server.address, "p0", 1024, 2048)
        assert torch.equal(got, pool[1024:3072])
        assert torch.equal(got.view(torch.int32), torch.arange(256, 768, dtype=torch.int32))
    finally:
        client.close()


def test_a_read_outside_the_pool_or_of_an_unknown_pool_names_it(context, served):
    server, signer, _ = served
    client = SlotClient(context, signer)
    try:
        with pytest.raises(ConnectionError, match="outside pool p0"):
            client.read(server.address, "p0", 16000, 1024)
        with pytest.raises(ConnectionError, match="no pool 'p9'"):
            client.read(server.address, "p9", 0, 16)
        assert client.read(server.address, "p0", 0, 4).tolist() == [0, 0, 0, 0]  # the socket still works
    finally:
        client.close()


def test_a_request_signed_with_another_secret_is_dropped_and_the_server_serves_on(context, served):
    server, signer, pool = served
    stranger = SlotClient(context, FrameSigner(new_secret()), timeout_s=0.5)
    client = SlotClient(context, FrameSigner(signer._secret))
    try:
        with pytest.raises(ConnectionError, match="no answer"):
            stranger.read(server.address, "p0", 0, 16)
        assert torch.equal(client.read(server.address, "p0", 0, 16), pool[:16])
    finally:
        stranger.close()
        client.close()


def test_a_captured_request_sent_again_gets_nothing(context, served):
    """Someone on the network who saw a signed read request cannot replay it for the slot's
    later contents (another request's data by then)."""
    server, signer, pool = served
    owner = FrameSigner(signer._secret)
    captured = owner.sign(msgspec.msgpack.encode(ReadRequest(1, "p0", 0, 16)))
    first = context.socket(zmq.DEALER)
    first.connect(server.address)
    first.send(captured)
    assert first.poll(5000) and len(first.recv_multipart()[1]) == 16  # the genuine one is served
    replay = context.socket(zmq.DEALER)
    replay.connect(server.address)
    replay.send(captured)
    first.send(captured)
    assert not replay.poll(500) and not first.poll(100)
    first.close(linger=0)
    replay.close(linger=0)


def test_a_forged_truncated_or_replayed_frame_fails_to_open():
    secret = new_secret()
    sender, receiver = FrameSigner(secret), FrameSigner(secret)
    first, second = sender.sign(b"task"), sender.sign(b"next")
    assert receiver.open(first[:-1] + b"X") is None
    assert receiver.open(b"short") is None
    assert FrameSigner(new_secret()).open(first) is None
    assert receiver.open(first) == b"task"
    assert receiver.open(first) is None  # the same frame again
    assert receiver.open(second) == b"next"
    assert receiver.open(first) is None  # an older one
    assert FrameSigner(secret).open(first) == b"task"  # counters are per receiver and sender


def test_a_socket_with_one_rightful_sender_takes_no_other_senders_frames():
    """A worker's task socket accepts only the engine-side signer made for its process: a frame
    the engine signed for another worker (or this worker's previous process) is not taken."""
    secret = new_secret()
    mine, theirs = FrameSigner(secret), FrameSigner(secret)
    opener = FrameSigner(secret, accept=mine.session)
    assert opener.open(theirs.sign(b"task for another worker")) is None
    assert opener.open(mine.sign(b"my task")) == b"my task"

"""The cross-node tensor link (engine/transport/tcp.py) on loopback: what a consumer reads is what
the producer wrote; a request without the engine's secret gets nothing."""

import socket
import struct

import msgspec
import pytest
import torch

from dfuse.engine.transport import tcp
from dfuse.engine.transport.tcp import FrameSigner, ReadRequest, ReceiveBuffers, SlotClient, SlotServer, new_secret


@pytest.fixture
def served():
    pool = torch.arange(4096, dtype=torch.int32).view(torch.uint8)  # 16 KiB of known bytes
    signer = FrameSigner(new_secret())
    server = SlotServer("127.0.0.1", signer, {"p0": pool}.get)
    yield server, signer, pool
    server.close()


def _connect(server: SlotServer) -> socket.socket:
    host, port = server.address.removeprefix("tcp://").split(":")
    return socket.create_connection((host, int(port)), timeout=5)


def _closed_by_server(connection: socket.socket) -> bool:
    try:
        return connection.recv(1) == b""
    except ConnectionResetError:
        return True


def test_a_read_returns_the_producers_bytes(served):
    server, signer, pool = served
    client = SlotClient(signer)
    try:
        got = client.read(server.address, "p0", 1024, 2048)
        assert torch.equal(got, pool[1024:3072])
        assert torch.equal(got.view(torch.int32), torch.arange(256, 768, dtype=torch.int32))
    finally:
        client.close()


def test_reads_land_in_a_kept_buffer_and_the_next_read_reuses_it(served):
    """A worker receives into buffers it keeps (a fresh one per read faults its pages in as
    the bytes arrive); a buffer given back carries the next read, with the new bytes."""
    server, signer, pool = served
    client, buffers = SlotClient(signer), ReceiveBuffers()
    try:
        first = buffers.take(4096)
        got = client.read(server.address, "p0", 0, 4096, into=first)
        assert torch.equal(got, pool[:4096]) and got.data_ptr() == first.data_ptr()
        buffers.give(first)
        second = buffers.take(3000)
        got = client.read(server.address, "p0", 8192, 3000, into=second)
        assert second.data_ptr() == first.data_ptr() and torch.equal(got, pool[8192:11192])
        assert buffers.take(100).data_ptr() != first.data_ptr()  # taken, and too big for 100 bytes anyway
    finally:
        client.close()


def test_a_read_outside_the_pool_or_of_an_unknown_pool_names_it(served):
    server, signer, _ = served
    client = SlotClient(signer)
    try:
        with pytest.raises(ConnectionError, match="outside pool p0"):
            client.read(server.address, "p0", 16000, 1024)
        with pytest.raises(ConnectionError, match="no pool 'p9'"):
            client.read(server.address, "p9", 0, 16)
        assert client.read(server.address, "p0", 0, 4).tolist() == [0, 0, 0, 0]  # the socket still works
    finally:
        client.close()


def test_a_request_signed_with_another_secret_is_dropped_and_the_server_serves_on(served):
    server, signer, pool = served
    stranger = SlotClient(FrameSigner(new_secret()), timeout_s=0.5)
    client = SlotClient(FrameSigner(signer._secret))
    try:
        with pytest.raises(ConnectionError, match="closed the connection"):
            stranger.read(server.address, "p0", 0, 16)
        assert torch.equal(client.read(server.address, "p0", 0, 16), pool[:16])
    finally:
        stranger.close()
        client.close()


def test_a_captured_request_sent_again_gets_nothing(served):
    """Someone on the network who saw a signed read request cannot replay it for the slot's
    later contents (another request's data by then)."""
    server, signer, pool = served
    owner = FrameSigner(signer._secret)
    captured = owner.sign(msgspec.msgpack.encode(ReadRequest(1, "p0", 0, 16)))
    framed = struct.pack(">I", len(captured)) + captured
    first = _connect(server)
    first.sendall(framed)
    header = first.recv(4 + tcp.MAX_FRAME_BYTES)
    assert len(header) > 4  # the genuine one is answered
    replay = _connect(server)
    replay.sendall(framed)
    assert _closed_by_server(replay)
    first.sendall(framed)
    while len(header) < 4 + struct.unpack(">I", header[:4])[0] + 16:  # the rest of the first reply
        header += first.recv(4096)
    assert _closed_by_server(first)
    first.close()
    replay.close()


def test_a_neighbour_announcing_a_huge_frame_or_never_reading_does_not_stop_the_server(served, monkeypatch):
    """Anyone on the network can connect: a connection that announces a frame bigger than any
    request is closed unread, and a consumer that stops reading mid-reply loses its connection
    after the send timeout, while the others are served."""
    server, signer, pool = served
    huge = _connect(server)
    huge.sendall(struct.pack(">I", 1 << 30) + b"x" * 64)
    assert _closed_by_server(huge)
    huge.close()

    big = torch.zeros(64 << 20, dtype=torch.uint8)  # more than the kernel buffers on loopback
    monkeypatch.setattr(tcp, "SEND_TIMEOUT_S", 0.5)
    stalled_server = SlotServer("127.0.0.1", signer, {"big": big}.get)
    stalled = _connect(stalled_server)
    client = SlotClient(FrameSigner(signer._secret))
    try:
        request = FrameSigner(signer._secret).sign(msgspec.msgpack.encode(ReadRequest(1, "big", 0, big.numel())))
        stalled.sendall(struct.pack(">I", len(request)) + request)  # and never reads the reply
        assert torch.equal(client.read(stalled_server.address, "big", 0, 16), big[:16])
    finally:
        client.close()
        stalled.close()
        stalled_server.close()


def test_a_consumer_reading_a_trickle_does_not_hold_the_server(served, monkeypatch):
    """The send timeout bounds one send call; a reader taking a few bytes at a time would keep
    every call alive. The whole reply has a deadline, so the next consumer is served."""
    import threading
    import time

    _, signer, _ = served
    big = torch.zeros(64 << 20, dtype=torch.uint8)
    monkeypatch.setattr(tcp, "SEND_TIMEOUT_S", 0.5)
    monkeypatch.setattr(tcp, "MIN_SEND_RATE", 1e12)  # the deadline: the send timeout alone
    monkeypatch.setattr(tcp, "SEND_CHUNK", big.numel())  # one send call for the whole reply
    server = SlotServer("127.0.0.1", signer, {"big": big}.get)
    trickle, stop = _connect(server), threading.Event()
    request = FrameSigner(signer._secret).sign(msgspec.msgpack.encode(ReadRequest(1, "big", 0, big.numel())))
    trickle.sendall(struct.pack(">I", len(request)) + request)

    def read_slowly():
        while not stop.is_set():
            try:
                if not trickle.recv(16 << 10):
                    return
            except OSError:
                return
            time.sleep(0.05)

    reader = threading.Thread(target=read_slowly, daemon=True)
    reader.start()
    client = SlotClient(FrameSigner(signer._secret), timeout_s=5)
    try:
        assert torch.equal(client.read(server.address, "big", 0, 16), big[:16])
    finally:
        stop.set()
        client.close()
        trickle.close()
        reader.join(5)
        server.close()


def test_strangers_filling_every_connection_cut_off_no_consumer(served, monkeypatch):
    """Past MAX_CONNECTIONS the server closes a connection that never sent a valid request
    before any consumer's, and the server thread survives the churn."""
    server, signer, pool = served
    monkeypatch.setattr(tcp, "MAX_CONNECTIONS", 4)
    client = SlotClient(FrameSigner(signer._secret))
    strangers = []
    try:
        assert torch.equal(client.read(server.address, "p0", 0, 16), pool[:16])  # its connection is the oldest
        for _ in range(12):
            strangers.append(_connect(server))
        assert torch.equal(client.read(server.address, "p0", 16, 16), pool[16:32])  # same connection, still open
        late = SlotClient(FrameSigner(signer._secret))
        assert torch.equal(late.read(server.address, "p0", 32, 16), pool[32:48])
        late.close()
    finally:
        client.close()
        for stranger in strangers:
            stranger.close()


def test_a_connection_that_never_sends_a_valid_request_is_closed(served, monkeypatch):
    server, _, _ = served
    monkeypatch.setattr(tcp, "AUTH_DEADLINE_S", 0.4)
    idle = _connect(server)
    idle.settimeout(10)
    assert _closed_by_server(idle)
    idle.close()


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


def test_a_worker_reads_each_task_inputs_from_another_node_right_while_reusing_buffers(served):
    """A worker's Endpoint pulls inputs from another node's pool into buffers it keeps: each
    task sees its own producer's values, a buffer is reused only once its task is released
    (done or cancelled), and a task still running keeps its inputs intact."""
    from dfuse.engine.protocol import TensorRef
    from dfuse.engine.transport.endpoint import Endpoint

    server, signer, pool = served
    endpoint = Endpoint(torch.device("cpu"), secret=signer._secret)
    endpoint.open_remote("p0", server.address)
    values = pool.view(torch.int32)

    def refs(slot: int) -> list[TensorRef]:  # two tensors of a task in one 4 KiB slot
        return [TensorRef("a", "p0", slot * 4096, (256,), "int32"), TensorRef("b", "p0", slot * 4096 + 1024, (2, 64), "int32")]

    endpoint.prefetch(1, refs(0))
    first = endpoint.fetch(1, refs(0))
    endpoint.prefetch(2, refs(1))  # while task 1 runs: must not land in task 1's buffer
    second = endpoint.fetch(2, refs(1))
    assert torch.equal(first["a"], values[0:256]) and torch.equal(first["b"].flatten(), values[256:384])
    assert torch.equal(second["a"], values[1024:1280])
    endpoint.release(1)
    endpoint.prefetch(3, refs(2))  # task 1's buffer again, now with slot 2's bytes
    third = endpoint.fetch(3, refs(2))
    assert third["a"].data_ptr() == first["a"].data_ptr()
    assert torch.equal(third["a"], values[2048:2304]) and torch.equal(second["a"], values[1024:1280])
    endpoint.prefetch(4, refs(3))
    endpoint.discard_prefetched(4)  # cancelled before it ran: its buffer serves the next read
    endpoint.prefetch(5, refs(3))
    assert torch.equal(endpoint.fetch(5, refs(3))["b"].flatten(), values[3328:3456])
    # The same request twice (recovery rerouted it here while its first task still ran): the
    # first task's release gives back only what the first fetched, not the second's inputs.
    endpoint = Endpoint(torch.device("cpu"), secret=signer._secret)
    endpoint.open_remote("p0", server.address)
    endpoint.prefetch(7, refs(0))
    endpoint.fetch(7, refs(0))
    endpoint.prefetch(7, refs(1))
    endpoint.release(7)
    for other, slot in ((8, 2), (9, 3)):
        endpoint.prefetch(other, refs(slot))
    assert torch.equal(endpoint.fetch(7, refs(1))["a"], values[1024:1280])

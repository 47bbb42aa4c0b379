"""The cross-node tensor link (engine/transport/tcp.py) on loopback: what a consumer reads is what
the producer wrote; a request without the engine's secret gets nothing."""

import pytest
import torch
import zmq

from dfuse.engine.transport.tcp import FrameSigner, SlotClient, SlotServer, new_secret


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


def test_a_request_signed_with_another_secret_is_dropped(context, served):
    server, _, _ = served
    stranger = SlotClient(context, FrameSigner(new_secret()), timeout_s=0.5)
    try:
        with pytest.raises(ConnectionError, match="no answer"):
            stranger.read(server.address, "p0", 0, 16)
    finally:
        stranger.close()


def test_a_forged_or_truncated_frame_fails_to_open():
    signer = FrameSigner(new_secret())
    signed = signer.sign(b"task")
    assert signer.open(signed) == b"task"
    assert signer.open(signed[:-1] + b"X") is None
    assert signer.open(b"short") is None
    assert FrameSigner(new_secret()).open(signed) is None

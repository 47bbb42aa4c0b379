"""Tensors between nodes: a producer serves reads of its host pool over ZeroMQ TCP.

On one node, a consumer maps its producer's /dev/shm segment and reads in place. A consumer on
another node cannot, so the producer's process runs a `SlotServer` (a thread with a ROUTER
socket) and the consumer pulls a task's inputs with a `SlotClient` as soon as the task arrives,
on its receiver thread (transport/endpoint.py prefetch): the transfer hides behind the task the
consumer is computing, and the producer's server sends while the producer computes its next one.
Nothing is copied on the sending side (the frame points into the segment) and the receiver gets
one buffer per slot. Slot credits are unchanged: the engine frees the producer's slot when the
consumer reports the task done, so a slot is never rewritten while it is being sent.

Every frame carries an HMAC-SHA256 under the engine's secret and a per-sender counter
(`FrameSigner`): a request without a valid tag, or seen before, is dropped, so nobody without the
secret reads a slot or forges or replays a reply header. The tensor bytes themselves are not
hashed: HMAC-SHA256 costs more than the whole transfer at 16 MiB (bench/results/README.md,
handoff over tcp); they travel on the TCP connection the consumer opened to the address the
engine announced. Nothing is encrypted: run a cluster on a network you trust (or a VPN).
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import logging
import secrets
import threading
import time
import warnings
from typing import Callable

import msgspec
import torch
import zmq

from .drop_log import DropLog

log = logging.getLogger("dfuse.transport")

TAG_BYTES = 32  # HMAC-SHA256
HEADER_BYTES = TAG_BYTES + 16  # tag | session (8) | counter (8)
MAX_REQUEST_BYTES = 64 << 10  # a read request is a few dozen bytes: bigger frames are refused unread
READ_TIMEOUT_S = 20.0  # a producer that stops answering (its node died) fails the read, not the worker


def new_secret() -> bytes:
    return secrets.token_bytes(32)


class FrameSigner:
    """HMAC on every frame of a cross-node socket, and no frame accepted twice.

    `sign` prefixes tag | session | counter: the session is this signer's (random), the counter
    counts its frames; the MAC covers both and the frame. `open` checks the tag and that the
    counter is above the last one seen from that session, so a frame captured on the network and
    sent again (to the same socket or another) is dropped like a forged one. One signer per
    sending socket (frames of one session must arrive in order: one connection) and per thread.
    """

    MAX_SESSIONS = 4096  # senders remembered per receiver (workers, their restarts, slot clients)

    def __init__(self, secret: bytes, accept: bytes | None = None):
        """`accept`: open only frames of that session (a socket with one rightful sender: a
        worker's task socket takes only its own engine-side signer's frames, so a frame the
        engine sent to another worker, or to this worker's previous process, is not taken)."""
        if len(secret) < 16:
            raise ValueError("secret: at least 16 bytes")
        self._secret = secret
        self.session = secrets.token_bytes(8)
        self._accept = accept
        self._counter = 0
        self._last: dict[bytes, int] = {}  # session -> its last counter opened here

    def _tag(self, body: bytes) -> bytes:
        return hmac.new(self._secret, body, hashlib.sha256).digest()

    def sign(self, frame: bytes) -> bytes:
        self._counter += 1
        body = self.session + self._counter.to_bytes(8, "big") + frame
        return self._tag(body) + body

    def open(self, signed: bytes) -> bytes | None:
        """The frame without its header, or None when the tag is missing or wrong (forged, or
        signed under another engine's secret) or the frame was seen before (replayed)."""
        if len(signed) < HEADER_BYTES:
            return None
        tag, body = signed[:TAG_BYTES], signed[TAG_BYTES:]
        if not hmac.compare_digest(tag, self._tag(body)):
            return None
        session, counter = body[:8], int.from_bytes(body[8:16], "big")
        if counter <= self._last.get(session, 0) or (self._accept is not None and session != self._accept):
            return None
        self._last.pop(session, None)  # re-inserted last: the dict stays in order of use
        self._last[session] = counter
        if len(self._last) > self.MAX_SESSIONS:
            del self._last[next(iter(self._last))]
        return body[16:]


class ReadRequest(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    nonce: int  # echoed in the reply: a late reply to an abandoned read is told apart
    pool: str
    offset: int
    nbytes: int


class ReadReply(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    nonce: int
    error: str | None = None  # set when the range cannot be served; the data frame is then empty


_SERVERS = itertools.count()  # names each server's stop socket: ids of collected objects come back
_request_decoder = msgspec.msgpack.Decoder(ReadRequest)
_reply_decoder = msgspec.msgpack.Decoder(ReadReply)
_encoder = msgspec.msgpack.Encoder()


class SlotServer:
    """Serves byte ranges of this process's host pools to consumers on other nodes.

    `buffers(pool)` returns the flat uint8 tensor of a pool this process may serve, or None.
    Runs on a thread of its own with its own socket; `close()` stops it."""

    def __init__(self, context: zmq.Context, host: str, signer: FrameSigner,
                 buffers: Callable[[str], torch.Tensor | None]):
        self._signer = signer
        self._buffers = buffers
        self._drops = DropLog(log)  # anyone on the network can send here
        self._socket = context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST_BYTES)  # a stranger's huge frame is not buffered
        port = self._socket.bind_to_random_port(f"tcp://{host}")
        self.address = f"tcp://{host}:{port}"
        self._stop = context.socket(zmq.PAIR)  # close() rings it: the server thread owns _socket
        self._stop_address = f"inproc://slot-server-stop-{next(_SERVERS)}"
        self._stop.bind(self._stop_address)
        self._thread = threading.Thread(target=self._serve, args=(context,), daemon=True, name="slot-server")
        self._thread.start()

    def _serve(self, context: zmq.Context) -> None:
        stop = context.socket(zmq.PAIR)
        stop.connect(self._stop_address)
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(stop, zmq.POLLIN)
        try:
            while True:
                events = dict(poller.poll())
                if stop in events:
                    return
                frames = self._socket.recv_multipart()
                if len(frames) != 2:
                    self._drops.warning("slot server dropped a request of %d frames", len(frames))
                    continue
                try:
                    self._answer(*frames)
                except Exception:  # one bad request must not end the server: every later read would time out
                    log.exception("slot server could not answer a request")
        finally:
            stop.close(linger=0)
            self._socket.close(linger=0)

    def _answer(self, peer: bytes, signed: bytes) -> None:
        frame = self._signer.open(signed)
        if frame is None:
            self._drops.warning("slot server dropped a request with a bad signature (%d bytes)", len(signed))
            return
        try:
            request = _request_decoder.decode(frame)
        except msgspec.MsgspecError as e:
            self._drops.warning("slot server dropped a malformed request: %s", e)
            return
        buffer = self._buffers(request.pool)
        error = None
        if buffer is None:
            error = f"no pool {request.pool!r} here"
        elif request.offset < 0 or request.nbytes < 0 or request.offset + request.nbytes > buffer.numel():
            error = f"[{request.offset}, {request.offset + request.nbytes}) lies outside pool {request.pool}"
        header = self._signer.sign(_encoder.encode(ReadReply(request.nonce, error)))
        data = b"" if error else memoryview(buffer.numpy())[request.offset : request.offset + request.nbytes]
        self._socket.send_multipart([peer, header, data], copy=False)

    def close(self) -> None:
        try:
            self._stop.send(b"")
        except zmq.ZMQError:
            pass
        self._thread.join(5)
        self._stop.close(linger=0)


class SlotClient:
    """Reads byte ranges of pools served by `SlotServer`s on other nodes. One socket per server;
    not thread-safe (the caller serializes, as transport/endpoint.py does under its lock)."""

    def __init__(self, context: zmq.Context, signer: FrameSigner, timeout_s: float = READ_TIMEOUT_S):
        self._context = context
        self._signer = signer
        self._timeout_ms = int(timeout_s * 1000)
        self._drops = DropLog(log)
        self._sockets: dict[str, zmq.Socket] = {}
        self._nonce = 0

    def read(self, address: str, pool: str, offset: int, nbytes: int) -> torch.Tensor:
        """The bytes [offset, offset + nbytes) of `pool`, served at `address`, as a uint8 tensor
        that owns its memory (the received frame)."""
        socket = self._socket(address)
        self._nonce += 1
        socket.send(self._signer.sign(_encoder.encode(ReadRequest(self._nonce, pool, offset, nbytes))))
        deadline = time.monotonic() + self._timeout_ms / 1000  # stray replies do not extend it
        while True:
            if not socket.poll(max(0, int((deadline - time.monotonic()) * 1000))):
                self._drop(address)  # a reply that arrives later must not answer the next read
                raise ConnectionError(f"no answer from {address} for pool {pool} within {self._timeout_ms / 1000:.0f} s")
            header, data = self._recv(socket)
            if header is None or header.nonce != self._nonce:
                continue  # forged, or the late answer to an abandoned read
            if header.error:
                raise ConnectionError(f"{address} could not serve pool {pool}: {header.error}")
            if len(data) != nbytes:
                raise ConnectionError(f"{address} sent {len(data)} bytes of pool {pool}, not {nbytes}")
            if not nbytes:
                return torch.empty(0, dtype=torch.uint8)
            with warnings.catch_warnings():  # zmq marks the received buffer read-only; inputs are only read
                warnings.simplefilter("ignore", UserWarning)
                return torch.frombuffer(data.buffer, dtype=torch.uint8)  # keeps the frame alive

    def _recv(self, socket: zmq.Socket):
        frames = socket.recv_multipart(copy=False)
        if len(frames) != 2:
            return None, None
        frame = self._signer.open(frames[0].bytes)
        if frame is None:
            self._drops.warning("dropped a slot reply with a bad signature")
            return None, None
        try:
            return _reply_decoder.decode(frame), frames[1]
        except msgspec.MsgspecError:
            return None, None

    def _socket(self, address: str) -> zmq.Socket:
        socket = self._sockets.get(address)
        if socket is None:
            socket = self._sockets[address] = self._context.socket(zmq.DEALER)
            socket.setsockopt(zmq.LINGER, 0)
            socket.connect(address)
        return socket

    def _drop(self, address: str) -> None:
        socket = self._sockets.pop(address, None)
        if socket is not None:
            socket.close(linger=0)

    def close(self) -> None:
        for address in list(self._sockets):
            self._drop(address)

"""Tensors between nodes: a producer serves reads of its host pool over plain TCP.

On one node, a consumer maps its producer's /dev/shm segment and reads in place. A consumer on
another node cannot, so the producer's process runs a `SlotServer` (a thread with a listening
socket) and the consumer pulls a task's inputs with a `SlotClient` as soon as the task arrives,
on its receiver thread (transport/endpoint.py prefetch): the transfer hides behind the task the
consumer is computing, and the producer's server sends while the producer computes its next one.
The bytes go from the producer's segment to the kernel and from the kernel straight into a
buffer the consumer keeps for the next read (`ReceiveBuffers`): no copy in user space on either
side, and no fresh buffer whose pages fault in one by one, as a ZeroMQ reply's did
(bench/results/README.md, handoff over TCP, run 5). Slot
credits are unchanged: the engine frees the producer's slot when the consumer reports the task
done, so a slot is never rewritten while it is being sent.

On a connection, a read is one request frame (a 4-byte length, then the frame) and one reply
frame followed by exactly the bytes it announces. Every frame carries an HMAC-SHA256 under the
engine's secret and a per-sender counter (`FrameSigner`): a request without a valid tag, or seen
before, closes the connection unanswered, so nobody without the secret reads a slot or forges or
replays a reply header. The tensor bytes themselves are not hashed: HMAC-SHA256 costs more than
the whole transfer at 16 MiB (bench/results/README.md, handoff over tcp); they travel on the
TCP connection the consumer opened to the address the engine announced. Nothing is encrypted:
run a cluster on a network you trust (or a VPN). Control messages stay on ZeroMQ.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import selectors
import socket
import struct
import threading
import time
from typing import Callable

import msgspec
import torch

from .drop_log import DropLog

log = logging.getLogger("dfuse.transport")

TAG_BYTES = 32  # HMAC-SHA256
HEADER_BYTES = TAG_BYTES + 16  # tag | session (8) | counter (8)
MAX_FRAME_BYTES = 64 << 10  # requests and reply headers are a few dozen bytes: a bigger frame closes the connection
READ_TIMEOUT_S = 30.0  # a producer that stops answering (its node died) fails the read, not the worker
# A consumer that stops reading mid-reply loses its connection, not the server, after SEND_TIMEOUT_S
# without progress, or once the reply took SEND_TIMEOUT_S plus its bytes at MIN_SEND_RATE: shorter
# than READ_TIMEOUT_S, so a consumer queued behind a stalled one still gets its answer.
# (A bound for one stalled consumer at a time: replies are sent one after another.)
SEND_TIMEOUT_S = 10.0
MIN_SEND_RATE = 5e6  # bytes/s: 40 Mbit/s, below any link a cluster runs on
SEND_CHUNK = 4 << 20  # the deadline is checked between sends of at most this
ACCEPT_PAUSE_S = 1.0  # after accept() failed for want of file descriptors: not a busy loop meanwhile
MAX_CONNECTIONS = 256  # open connections a server keeps; beyond, a stranger's (or the least recently used) is closed
AUTH_DEADLINE_S = 10.0  # a connection with no valid request by then is closed
MAX_CLIENT_CONNECTIONS = 64  # servers a client stays connected to (retired agents' addresses get dropped)
_LENGTH = struct.Struct(">I")


def new_secret() -> bytes:
    return secrets.token_bytes(32)


class FrameSigner:
    """HMAC on every frame of a cross-node socket, and no frame accepted twice.

    `sign` prefixes tag | session | counter: the session is this signer's (random), the counter
    counts its frames; the MAC covers both and the frame. `open` checks the tag and that the
    counter is above the last one seen from that session, so a frame captured on the network and
    sent again to the same receiver is dropped like a forged one. (Another receiver keeps its own
    counters: a read request replayed to another node's slot server names a pool that server
    does not have, as pool names carry their agent's prefix.) One signer per
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
    nonce: int  # echoed in the reply: a reply out of step with its request closes the connection
    pool: str
    offset: int
    nbytes: int


class ReadReply(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    nonce: int
    nbytes: int  # the bytes that follow this frame on the connection
    error: str | None = None  # set when the range cannot be served; nothing follows then


_request_decoder = msgspec.msgpack.Decoder(ReadRequest)
_reply_decoder = msgspec.msgpack.Decoder(ReadReply)
_encoder = msgspec.msgpack.Encoder()


def _host_port(address: str) -> tuple[str, int]:
    """("host", port) of "tcp://host:port" (an IPv6 host in brackets)."""
    host, _, port = address.removeprefix("tcp://").rpartition(":")
    return host.strip("[]"), int(port)


def recv_exactly(connection: socket.socket, view: memoryview) -> None:
    """Fill `view` from `connection`. On a blocking socket MSG_WAITALL makes it one call that
    wakes this thread once, not once per arriving segment."""
    got = 0
    while got < len(view):
        n = connection.recv_into(view[got:], 0, socket.MSG_WAITALL)
        if not n:
            raise ConnectionError("the other side closed the connection")
        got += n


def _recv_frame(connection: socket.socket) -> bytes:
    length = bytearray(_LENGTH.size)
    recv_exactly(connection, memoryview(length))
    (nbytes,) = _LENGTH.unpack(length)
    if nbytes > MAX_FRAME_BYTES:
        raise ConnectionError(f"a frame of {nbytes} bytes announced (at most {MAX_FRAME_BYTES})")
    frame = bytearray(nbytes)
    recv_exactly(connection, memoryview(frame))
    return bytes(frame)


def _timeval(seconds: float) -> bytes:
    """`seconds` as SO_RCVTIMEO / SO_SNDTIMEO take it: at least 1 ms, as 0 would mean never."""
    seconds = max(seconds, 0.001)
    return struct.pack("ll", int(seconds), int((seconds - int(seconds)) * 1e6))


def _frame(frame: bytes) -> bytes:
    return _LENGTH.pack(len(frame)) + frame


class _Peer:
    """A connection to a SlotServer: what it sent that is not a whole frame yet, and whether it
    ever sent a valid one (a consumer) and when it last did."""

    __slots__ = ("received", "signed_in", "since")

    def __init__(self, now: float):
        self.received = bytearray()
        self.signed_in = False
        self.since = now  # accepted at, then the time of its last valid request


class SlotServer:
    """Serves byte ranges of this process's host pools to consumers on other nodes.

    `buffers(pool)` returns the flat uint8 tensor of a pool this process may serve, or None.
    Runs on a thread of its own; `close()` stops it. One reply is sent at a time (reads are
    bound by the link), within a deadline (SEND_TIMEOUT_S). Anyone on the network can connect:
    a connection that sends no valid request within AUTH_DEADLINE_S is closed, and when
    MAX_CONNECTIONS are open such a stranger's goes first, consumers' only after."""

    def __init__(self, host: str, signer: FrameSigner, buffers: Callable[[str], torch.Tensor | None]):
        self._signer = signer
        self._buffers = buffers
        self._drops = DropLog(log)  # anyone on the network can connect here
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.create_server((host, 0), family=family)
        self._listener.setblocking(False)
        port = self._listener.getsockname()[1]
        self.address = f"tcp://[{host}]:{port}" if family == socket.AF_INET6 else f"tcp://{host}:{port}"
        self._wake, self._woken = socket.socketpair()  # close() rings it: the server thread owns the sockets
        self._peers: dict[socket.socket, _Peer] = {}
        self._selector = selectors.DefaultSelector()
        self._accept_again_at: float | None = None  # the listener is not watched until then
        self._thread = threading.Thread(target=self._serve, daemon=True, name="slot-server")
        self._thread.start()

    def _serve(self) -> None:
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._woken, selectors.EVENT_READ)
        try:
            while True:
                events = self._selector.select(timeout=min(AUTH_DEADLINE_S / 4, ACCEPT_PAUSE_S))
                if self._accept_again_at is not None and time.monotonic() >= self._accept_again_at:
                    self._accept_again_at = None
                    self._selector.register(self._listener, selectors.EVENT_READ)
                for key, _ in events:
                    if key.fileobj is self._woken:
                        return
                    try:
                        if key.fileobj is self._listener:
                            self._accept()
                        elif key.fileobj in self._peers and not self._receive(key.fileobj):  # may be closed already
                            self._hang_up(key.fileobj)
                    except Exception:  # nothing a peer does may end this thread: every later read would fail
                        log.exception("slot server: a connection failed")
                        if key.fileobj in self._peers:
                            self._hang_up(key.fileobj)
                self._close_strangers()
        finally:
            for connection in list(self._peers):
                self._hang_up(connection)
            self._selector.close()
            self._listener.close()
            self._woken.close()

    def _accept(self) -> None:
        try:
            connection, _ = self._listener.accept()
        except BlockingIOError:  # the connection went before it was taken
            return
        except OSError as e:  # EMFILE & co: the listener stays readable; look again in a while
            self._drops.warning("slot server could not accept a connection: %s", e)
            self._selector.unregister(self._listener)
            self._accept_again_at = time.monotonic() + ACCEPT_PAUSE_S
            return
        try:
            # Blocking, with the kernel's send timeout: a reply is sent without a poll per chunk;
            # requests are read only when the selector says some arrived, without waiting.
            connection.setblocking(True)
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(SEND_TIMEOUT_S))
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            connection.close()
            return
        if len(self._peers) >= MAX_CONNECTIONS:
            self._drops.warning("slot server at %d connections: closed one", MAX_CONNECTIONS)
            self._hang_up(min(self._peers, key=lambda c: (self._peers[c].signed_in, self._peers[c].since)))
        try:
            self._selector.register(connection, selectors.EVENT_READ)
        except (OSError, ValueError):
            connection.close()
            return
        self._peers[connection] = _Peer(time.monotonic())

    def _close_strangers(self) -> None:
        """Close the connections that sent no valid request within AUTH_DEADLINE_S. One whose
        bytes wait unread (this thread was sending meanwhile) is read first."""
        too_old = time.monotonic() - AUTH_DEADLINE_S
        for connection in [c for c, peer in self._peers.items() if not peer.signed_in and peer.since < too_old]:
            try:
                if connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
                    continue
            except OSError:  # BlockingIOError: nothing came; anything else: it is broken
                pass
            self._hang_up(connection)

    def _hang_up(self, connection: socket.socket) -> None:
        self._selector.unregister(connection)
        del self._peers[connection]
        connection.close()

    def _receive(self, connection: socket.socket) -> bool:
        """Answer the whole requests `connection` has sent; False when it must be closed."""
        try:
            data = connection.recv(MAX_FRAME_BYTES, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not data:
            return False
        peer = self._peers[connection]
        received = peer.received
        received += data
        while len(received) >= _LENGTH.size:
            (nbytes,) = _LENGTH.unpack_from(received)
            if nbytes > MAX_FRAME_BYTES:
                self._drops.warning("slot server dropped a connection announcing a %d-byte request", nbytes)
                return False
            if len(received) < _LENGTH.size + nbytes:
                return True
            frame = bytes(received[_LENGTH.size : _LENGTH.size + nbytes])
            del received[: _LENGTH.size + nbytes]
            try:
                if not self._answer(connection, peer, frame):
                    return False
            except OSError:  # BlockingIOError: SO_SNDTIMEO ran out; TimeoutError: the deadline did
                return False  # the consumer stopped reading, or went away
        return True

    def _answer(self, connection: socket.socket, peer: _Peer, signed: bytes) -> bool:
        frame = self._signer.open(signed)
        if frame is None:
            self._drops.warning("slot server dropped a request with a bad signature (%d bytes)", len(signed))
            return False
        try:
            request = _request_decoder.decode(frame)
        except msgspec.MsgspecError as e:
            self._drops.warning("slot server dropped a malformed request: %s", e)
            return False
        peer.signed_in, peer.since = True, time.monotonic()
        buffer = self._buffers(request.pool)
        error = None
        if buffer is None:
            error = f"no pool {request.pool!r} here"
        elif request.offset < 0 or request.nbytes < 0 or request.offset + request.nbytes > buffer.numel():
            error = f"[{request.offset}, {request.offset + request.nbytes}) lies outside pool {request.pool}"
        nbytes = 0 if error else request.nbytes
        header = _frame(self._signer.sign(_encoder.encode(ReadReply(request.nonce, nbytes, error))))
        data = memoryview(buffer.numpy())[request.offset : request.offset + nbytes] if nbytes else memoryview(b"")
        deadline = time.monotonic() + SEND_TIMEOUT_S + nbytes / MIN_SEND_RATE
        for part in (memoryview(header), data):  # one reply at a time
            _send_within(connection, part, deadline)
        return True

    def close(self) -> None:
        try:
            self._wake.send(b"x")
        except OSError:
            pass
        self._thread.join(5)
        self._wake.close()


def _send_within(connection: socket.socket, data: memoryview, deadline: float) -> None:
    """sendall, but TimeoutError at `deadline`: a consumer reading a trickle must not hold the
    server (SO_SNDTIMEO bounds one send call only; sendall goes on while any byte moves)."""
    sent = 0
    while sent < len(data):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the consumer reads too slowly")
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(min(SEND_TIMEOUT_S, left)))
        sent += connection.send(data[sent : sent + SEND_CHUNK])


class ReceiveBuffers:
    """Host memory that reads from other nodes land in, kept for later reads. A new buffer per
    read would fault its pages in one by one as the bytes arrive; a worker holds a buffer per
    task in flight (the one computing, the one prefetched), so keeping a few is enough."""

    def __init__(self, keep: int = 4):
        self._keep = keep
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()  # the receiver thread and the compute loop both take and give

    def take(self, nbytes: int) -> torch.Tensor:
        """A uint8 buffer of at least `nbytes` (at most twice that, so small reads do not hold big buffers)."""
        with self._lock:
            fitting = [i for i, b in enumerate(self._free) if nbytes <= b.numel() <= 2 * nbytes]
            if fitting:
                return self._free.pop(min(fitting, key=lambda i: self._free[i].numel()))
        return torch.empty(nbytes, dtype=torch.uint8)

    def give(self, buffer: torch.Tensor) -> None:
        """`buffer` back: nothing reads it any more. The ones given back longest ago go first:
        the sizes read now are the ones worth keeping."""
        with self._lock:
            self._free.append(buffer)
            if len(self._free) > self._keep:
                del self._free[0]


class SlotClient:
    """Reads byte ranges of pools served by `SlotServer`s on other nodes. One connection per
    server; not thread-safe (the caller serializes, as transport/endpoint.py does under its lock)."""

    def __init__(self, signer: FrameSigner, timeout_s: float = READ_TIMEOUT_S):
        self._signer = signer
        self._timeout_s = timeout_s
        self._connections: dict[str, socket.socket] = {}
        self._nonce = 0

    def read(self, address: str, pool: str, offset: int, nbytes: int, into: torch.Tensor | None = None) -> torch.Tensor:
        """The bytes [offset, offset + nbytes) of `pool`, served at `address`, as a uint8 tensor:
        the first `nbytes` of `into` (a uint8 buffer, e.g. from ReceiveBuffers), or a new one."""
        if into is not None and (into.dtype != torch.uint8 or into.device.type != "cpu" or into.dim() != 1
                                 or not into.is_contiguous() or into.numel() < nbytes):
            raise ValueError(f"into: a flat, contiguous uint8 CPU buffer of at least {nbytes} bytes")
        try:
            reply, data = self._transfer(address, pool, offset, nbytes, into)
        except (TimeoutError, BlockingIOError):  # connecting; SO_RCVTIMEO or SO_SNDTIMEO ran out
            self._drop(address)  # a reply that arrives later must not answer the next read
            raise ConnectionError(f"no answer from {address} for pool {pool} within {self._timeout_s:g} s") from None
        except OSError as e:  # refused, reset, closed (a request it did not take), or out of step
            self._drop(address)
            raise ConnectionError(f"reading pool {pool} from {address}: {e}") from None
        except BaseException:  # anything else mid-read (out of memory, an interrupt): the reply may be unread
            self._drop(address)
            raise
        if reply.error:
            raise ConnectionError(f"{address} could not serve pool {pool}: {reply.error}")
        return data

    def _transfer(self, address: str, pool: str, offset: int, nbytes: int, into: torch.Tensor | None):
        self._nonce += 1
        connection = self._connection(address)
        connection.sendall(_frame(self._signer.sign(_encoder.encode(ReadRequest(self._nonce, pool, offset, nbytes)))))
        reply = self._reply(connection)
        if reply.error:
            return reply, None
        if reply.nbytes != nbytes:
            raise ConnectionError(f"{reply.nbytes} bytes announced, not {nbytes}")
        data = into[:nbytes] if into is not None else torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            recv_exactly(connection, memoryview(data.numpy()))
        return reply, data

    def _reply(self, connection: socket.socket) -> ReadReply:
        header = self._signer.open(_recv_frame(connection))
        if header is None:
            raise ConnectionError("a reply with a bad signature")
        try:
            reply = _reply_decoder.decode(header)
        except msgspec.MsgspecError as e:
            raise ConnectionError(f"a malformed reply: {e}") from None
        if reply.nonce != self._nonce:
            raise ConnectionError("a reply to another request")
        return reply

    def _connection(self, address: str) -> socket.socket:
        connection = self._connections.get(address)
        if connection is None:
            connection = socket.create_connection(_host_port(address), timeout=self._timeout_s)
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # Blocking, with the kernel's timeouts instead of Python's (which makes the socket
            # non-blocking, and MSG_WAITALL void): a call with no progress for timeout_s fails.
            connection.settimeout(None)
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(self._timeout_s))
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(self._timeout_s))
            if len(self._connections) >= MAX_CLIENT_CONNECTIONS:  # the least recently used first
                self._drop(next(iter(self._connections)))
            self._connections[address] = connection
        else:
            self._connections[address] = self._connections.pop(address)  # now the most recently used
        return connection

    def _drop(self, address: str) -> None:
        connection = self._connections.pop(address, None)
        if connection is not None:
            connection.close()

    def close(self) -> None:
        for address in list(self._connections):
            self._drop(address)

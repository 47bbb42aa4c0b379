"""What the routes share: the engine (None while it starts), the server's own limits, the count of
images in flight (for --max-queue and draining), and the tools that serve outputs.

Routes run on the event loop; engine futures resolve on the engine's completion thread, so
`wait` bridges them with asyncio.wrap_future and cancels the engine's work when the client
goes away."""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

from fastapi import Request

from ..engine.engine import Engine
from ..engine.state import EngineClosed, RequestFailed, RequestTimeout
from .errors import APIError, bad_field
from .files import FileStore
from .metrics import Metrics


@dataclass
class ServeSettings:
    model_name: str  # the id clients name in "model" (default: --model as given)
    api_key: str | None = None  # every /v1 route needs "Authorization: Bearer KEY" when set
    max_queue: int = 1024  # images in flight beyond which new requests get 429 (vLLM-Omni's default)
    max_body_bytes: int = 1 << 20
    url_ttl_s: float = 3600.0  # how long a response_format="url" file or a video's content is served
    max_file_bytes: int = 4 << 30  # outputs kept for URLs in all; the oldest go first
    encode_threads: int = 2  # PNG/JPEG/MP4 encoding, off the event loop


class ClientGone(Exception):
    """The client disconnected before its response was ready; its work was cancelled."""


@dataclass
class ServerState:
    settings: ServeSettings
    engine: Engine | None = None
    engine_error: str | None = None  # why the engine could not start
    draining: bool = False  # SIGTERM or Ctrl-C: no new work, in-flight work finishes
    inflight: int = 0  # images submitted and not finished (all endpoints)
    created: int = field(default_factory=lambda: int(time.time()))
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _finished: list = field(default_factory=list)  # monotonic times of recent finishes (Retry-After)

    def __post_init__(self):
        self.metrics = Metrics(self.engine_stats)
        self.files = FileStore(self.settings.url_ttl_s, self.settings.max_file_bytes)
        self.encoder_pool = ThreadPoolExecutor(self.settings.encode_threads, thread_name_prefix="dfuse-encode")

    def engine_stats(self):
        return None if self.engine is None else self.engine.stats()

    def require_engine(self) -> Engine:
        if self.draining:
            raise APIError(503, "the server is shutting down and takes no new requests", code="draining")
        if self.engine is None:
            message = (f"the engine failed to start: {self.engine_error}" if self.engine_error
                       else "the engine is starting (its workers load their weights); try again shortly")
            raise APIError(503, message, code="starting", headers={"Retry-After": "5"})
        return self.engine

    # --- admission and in-flight accounting ----------------------------------------------------
    def admit(self, images: int) -> None:
        """Take `images` slots of --max-queue, or refuse with 429 and a Retry-After estimate."""
        with self._lock:
            if self.inflight + images > self.settings.max_queue:
                raise APIError(429, f"the server has {self.inflight} images in flight, its limit is "
                               f"{self.settings.max_queue} (--max-queue); retry later", code="queue_full",
                               headers={"Retry-After": str(self._retry_after())})
            self.inflight += images
        self.metrics.running.set(self.inflight)

    def release(self, images: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.inflight -= images
            self._finished = [t for t in self._finished if now - t < 60] + [now] * images
        self.metrics.running.set(self.inflight)

    def _retry_after(self) -> int:
        """Seconds until the queue has room at the pace of the last minute's finishes."""
        now = time.monotonic()
        recent = [t for t in self._finished if now - t < 60]
        rate = len(recent) / 60
        return 1 if rate == 0 else max(1, min(60, math.ceil((self.inflight - self.settings.max_queue + 1) / rate)))

    # --- requests --------------------------------------------------------------------------------
    @contextmanager
    def outcome(self, endpoint: str, success: str | None = "completed"):
        """Count the request under its outcome, whatever way it ends (success=None: not when it
        succeeds, e.g. a video job is counted when the job ends)."""
        outcome = success
        try:
            yield
        except ClientGone:
            outcome = "cancelled"
            raise
        except APIError as e:
            outcome = {429: "rejected", 503: "unavailable", 504: "timeout"}.get(e.status,
                                                                                "invalid" if e.status < 500 else "failed")
            raise
        except BaseException:
            outcome = "failed"
            raise
        finally:
            if outcome is not None:
                self.metrics.requests.labels(endpoint, outcome).inc()

    def submit(self, engine: Engine, prompts: list[str], **fields) -> Future:
        """engine.submit with the server's accounting; engine refusals become OpenAI errors."""
        self.admit(len(prompts))
        try:
            future = engine.submit(prompts, **fields)
        except ValueError as e:
            self.release(len(prompts))
            raise bad_field(str(e)) from None
        except EngineClosed:
            self.release(len(prompts))
            raise APIError(503, "the engine is closed", code="draining") from None
        except BaseException:
            self.release(len(prompts))
            raise
        future.add_done_callback(lambda f: self._done(f, len(prompts)))
        return future

    def _done(self, future: Future, images: int) -> None:
        self.release(images)
        if not future.cancelled() and future.exception() is None:
            self.metrics.observe_images(future.result().timings)

    async def wait(self, future: Future, request: Request):
        """The engine's result, or the error the client should see. A client that disconnects
        first cancels the work (the engine drops it between stages, a DiT stops at its next step)."""
        result = asyncio.wrap_future(future)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
            if result not in done:
                raise ClientGone()
            return result.result()
        except RequestTimeout as e:
            raise APIError(504, f"timeout: {e}", param="timeout", code="timeout") from None
        except RequestFailed as e:
            raise APIError(500, f"generation failed: {e}", code="generation_failed") from None
        except EngineClosed:
            raise APIError(503, "the engine closed before the request finished", code="draining") from None
        finally:
            gone.cancel()
            future.cancel()  # a no-op once it is done; otherwise the client is gone or we are cancelled

    async def run_blocking(self, fn, *args):
        """Encoding (PNG, MP4) on the encoder threads: the event loop keeps answering."""
        return await asyncio.get_running_loop().run_in_executor(self.encoder_pool, fn, *args)

    def close(self) -> None:
        self.encoder_pool.shutdown(wait=True)
        self.files.close()


async def read_json(request: Request, limit: int):
    """The body as JSON, refused with 413 past `limit` bytes (checked while it streams in)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is {declared} bytes; at most {limit} are accepted", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body is over {limit} bytes", code="body_too_large")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone: the ASGI server sends http.disconnect once the body has
    been read and the connection closes."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return

"""How requests leave the engine core: completed (pixels out of the decoder's slot), failed,
dropped (cancelled), or timed out while they wait or compute. A mixin of `EngineCore`
(engine/core.py), on the core thread, using its `_stats`, `_copy_out`, `completions`,
`_elastic`, `_queues`, `workers` and `_send_control`.
"""

from __future__ import annotations

import time

from . import protocol as wire
from .state import EngineClosed, Request, RequestFailed, RequestTimeout, Worker
from .transport.base import byte_view, dtype_from_name


class RequestExits:
    # --- requests leaving the engine ---------------------------------------------------------
    def _finish(self, request: Request, worker: Worker, outputs: list[wire.TensorRef]) -> None:
        (ref,) = [r for r in outputs if r.name == "image"]
        dtype = dtype_from_name(ref.dtype)
        if worker.pool.served_at is not None:  # on another node: the copy-out thread reads it over TCP
            view = self._remote_pixels(worker, ref, dtype)
        else:
            view = byte_view(worker.pool.segment.data, ref.offset, ref.shape, dtype)
        self._copy_out.put(request, view, worker.pool)  # then _copied, on this thread

    def _copied(self, request: Request, pool, pixels, error: Exception | None, closing: bool = False) -> None:
        """The copy-out thread is done with a request's pixels (engine/completions.py): its slot
        may take new work, and the request leaves with its image; or, when the node holding the
        pixels left before they were read (a ConnectionError), it starts over on the nodes left."""
        pool.release(request.output_offset, request.id)
        if pixels is not None:
            self._stats.left(request, "completed")
            self._left(request)
            self.completions.resolve(request.future, result=(pixels, request.timings))
        elif request.future.cancelled():  # its caller stopped waiting: nothing to read again
            self._drop(request)
        elif isinstance(error, ConnectionError) and not closing:
            self._start_over_unreachable(request, "the engine", "pixels", str(error))
        elif isinstance(error, ConnectionError):
            self._fail(request, EngineClosed(f"the engine closed before request {request.id}'s pixels were read "
                                             f"from another node ({error})"))
        else:
            self._fail(request, RequestFailed(f"request {request.id}: copying its output failed: {error!r}"))

    def _fail(self, request: Request, error: Exception) -> None:
        self._release_inputs(request)
        self._stats.left(request, "failed")
        self._left(request)
        self.completions.resolve(request.future, error=error)

    def _drop(self, request: Request) -> None:
        self._release_inputs(request)
        self._left(request)

    def _left(self, request: Request) -> None:
        if self._elastic:
            self._elastic.finished(time.monotonic(), request.params)

    def _release_inputs(self, request: Request) -> None:
        if request.input_pool is not None:
            request.input_pool.release(request.input_offset, request.id)
            request.input_pool = None

    def _expire_waiting(self) -> None:
        """Cancelled and expired requests leave now: waiting ones at once, not when they reach a
        worker; computing ones once their worker stops (a DiT at its next denoising step, an
        encoder or decoder when its call returns)."""
        for queue in self._queues.values():
            for request in queue.remove_where(lambda r: r.future.cancelled() or r.expired()):
                self._enqueue(request)
        # Computing ones: the caller hears now, and the worker is told to stop (or to skip the
        # task if it has not started it); its StageFailed then releases the slots.
        for worker in self.workers.values():
            for request in worker.inflight.values():
                if request.expired() and not request.timed_out:
                    request.timed_out = True
                    self.completions.resolve(request.future, error=RequestTimeout(
                        f"request {request.id} passed its deadline in the {worker.stage} stage"))
                if (request.timed_out or request.future.cancelled()) and not request.cancel_sent:
                    request.cancel_sent = True
                    self._send_control(worker, wire.CancelTask(request.id))


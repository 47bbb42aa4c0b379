"""Start-up progress for a person waiting on it: which workers are starting, each one as it
becomes ready, and, when none has been for a while, which are still loading.

A worker's start (a fresh interpreter importing torch and diffusers, then its weights) takes
seconds with the tiny models and tens of seconds with real ones; without a word the wait looks
like a hang. The lines go to the `dfuse.engine.startup` logger at INFO: `dfuse run` and
`dfuse serve` show them as plain lines on stderr (not with -q), a program sees them when it logs
INFO. After start-up, a (re)started worker is an engine event like any other, said on
`dfuse.engine`.

Called from the engine core's thread only (engine/core.py)."""

from __future__ import annotations

import logging
import time
from typing import Mapping

from .protocol import Ready
from .state import Worker

log = logging.getLogger("dfuse.engine.startup")
engine_log = logging.getLogger("dfuse.engine")

REMIND_S = 10.0  # silence after which the workers still loading are named


class StartupProgress:
    def __init__(self, workers: Mapping[int, Worker]):
        self._workers = workers  # the core's own: ready flags as it sets them
        self._started = self._last_said = time.monotonic()
        self._over = False

    def starting(self) -> None:
        self._started = self._last_said = time.monotonic()
        log.info("Starting stage workers: %s", ", ".join(_named(w) for w in self._workers.values()))

    def ready(self, worker: Worker, message: Ready) -> None:
        """`worker` said READY (its `ready` flag already set)."""
        if self._over:
            engine_log.info("%s worker %d ready in %.2f s (pid %d)", worker.stage, worker.id, message.load_s, message.pid)
            return
        now = time.monotonic()
        ready = sum(w.ready for w in self._workers.values())
        # Since start-up began, not the worker's own load time: what the person has waited.
        log.info("%s ready in %.1f s (%d/%d)", _named(worker), now - self._started, ready, len(self._workers))
        self._last_said, self._over = now, ready == len(self._workers)

    def remind(self) -> None:
        """Called on every health check: after REMIND_S without news, name the workers still loading."""
        now = time.monotonic()
        if self._over or now - self._last_said < REMIND_S:
            return
        loading = [_named(w) for w in self._workers.values() if not w.ready]
        log.info("still loading after %.0f s: %s", now - self._started, ", ".join(loading))
        self._last_said = now


def _named(worker: Worker) -> str:
    return f"{worker.stage} worker {worker.id} on {worker.device}"

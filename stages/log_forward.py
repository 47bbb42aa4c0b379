"""What a worker on another node logs at WARNING and above, forwarded to the engine.

On the engine's host a worker's stderr is the engine's, so its warnings reach the user. On
another node they would stay in Ray's log files there, where nobody looks when a request fails.
This handler keeps them (bounded) until the worker's heartbeat thread sends them, as
`WorkerLog` messages on its own signed socket, once a second; the engine logs them under
"dfuse.worker", naming the worker and its device.
"""

from __future__ import annotations

import logging
import threading

from ..engine import protocol as wire

KEPT = 100  # records kept between two sends; more are counted, and the count is sent
MAX_TEXT = 8192  # characters of one record (a long traceback is cut): far under the engine's frame limit


class LogForwarder(logging.Handler):
    def __init__(self, worker_id: int):
        super().__init__(logging.WARNING)
        self.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        self._worker_id = worker_id
        self._kept: list[tuple[int, str]] = []
        self._dropped = 0
        self._kept_lock = threading.Lock()  # any thread may log; the heartbeat thread takes

    def emit(self, record: logging.LogRecord) -> None:
        try:
            # Text msgpack can always encode (a lone surrogate from a file name cannot be), cut
            # in the middle: a traceback's last line says what went wrong.
            text = self.format(record).encode("utf-8", "backslashreplace").decode("utf-8")
        except Exception:  # a record that cannot be formatted is not worth failing for
            return
        if len(text) > MAX_TEXT:
            text = text[: MAX_TEXT // 2] + "\n[...]\n" + text[-(MAX_TEXT // 2 - 8):]
        with self._kept_lock:
            if len(self._kept) >= KEPT:
                self._dropped += 1
                return
            self._kept.append((record.levelno, text))

    def take(self) -> list[wire.WorkerLog]:
        """The records kept since the last take, as messages for the engine."""
        with self._kept_lock:
            kept, dropped, self._kept, self._dropped = self._kept, self._dropped, [], 0
        messages = [wire.WorkerLog(self._worker_id, level, text) for level, text in kept]
        if dropped:
            messages.append(wire.WorkerLog(self._worker_id, logging.WARNING,
                                           f"{dropped} more log records were not forwarded (over {KEPT} a second)"))
        return messages

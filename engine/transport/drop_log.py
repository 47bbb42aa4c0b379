"""Warnings about frames dropped from peers, at most one per kind every few seconds.

Sockets that other machines can reach (the cluster's TCP sockets, a slot server) drop forged,
replayed and malformed frames. Each drop is worth a warning, but a neighbour sending garbage in
a loop must not turn the log into a flood that fills the disk and hides everything else: the
first drop of a kind is logged at once, later ones are counted and summed up in the next
warning of that kind, at most one per `every_s` seconds.
"""

from __future__ import annotations

import logging
import time

EVERY_S = 10.0


class DropLog:
    def __init__(self, logger: logging.Logger, every_s: float = EVERY_S, clock=time.monotonic):
        self._logger, self._every_s, self._clock = logger, every_s, clock
        self._kinds: dict[str, tuple[float, int]] = {}  # message format -> (last logged at, drops since)

    def warning(self, message: str, *args) -> None:
        """Log `message % args` now, or count it if one like it (same format) was logged lately."""
        now = self._clock()
        last, unlogged = self._kinds.get(message, (None, 0))
        if last is not None and now - last < self._every_s:
            self._kinds[message] = (last, unlogged + 1)
            return
        self._kinds[message] = (now, 0)
        if unlogged:
            message += " (and %d more like it in the last %.0f s)"
            args = (*args, unlogged, now - last)
        self._logger.warning(message, *args)

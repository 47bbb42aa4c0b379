"""The first code a worker process runs (`python -m dfuse.engine.worker_main ENTRY FD`, started by
engine/launcher.py): read the WorkerSpec from stdin, wrap the death pipe, import ENTRY by name
and call it. The engine names the worker code; it never imports it."""

from __future__ import annotations

import signal

# The engine decides how its workers stop (a worker runs in a session of its own, so a terminal's
# Ctrl-C does not reach it; one sent to it directly is ignored too, before the heavy imports).
signal.signal(signal.SIGINT, signal.SIG_IGN)

import importlib  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from multiprocessing.connection import Connection  # noqa: E402

from .protocol import decode_spec  # noqa: E402


def main(argv: list[str]) -> None:
    entry, death_fd = argv[0], int(argv[1])
    spec = decode_spec(sys.stdin.buffer.read())
    with open(os.devnull, "rb") as null:  # the spec pipe is done; nothing else reads stdin
        os.dup2(null.fileno(), 0)
    os.set_inheritable(death_fd, False)  # processes this worker starts must not keep it alive
    module, _, function = entry.partition(":")
    getattr(importlib.import_module(module), function)(spec, Connection(death_fd, writable=False))


if __name__ == "__main__":
    main(sys.argv[1:])

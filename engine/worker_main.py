"""The first code a worker process runs (`python -m dfuse.engine.worker_main ENTRY FD`, started by
engine/launcher.py): read the WorkerSpec from stdin, wrap the death pipe, import ENTRY by name
and call it. The engine names the worker code; it never imports it."""

from __future__ import annotations

import signal

# First of all: Ctrl-C reaches the terminal's whole process group, workers included, and the
# engine decides how its workers stop. Ignored before the heavy imports (torch, diffusers), which
# would otherwise each end in a KeyboardInterrupt traceback.
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

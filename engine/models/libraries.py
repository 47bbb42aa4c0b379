"""Quiet diffusers, transformers and huggingface_hub: loading bars and advice from N workers (or
a benchmark's in-process pipeline, or the CLI resolving a hub model) would bury dfuse's own
output. What they still say (errors) and Python warnings (deprecations, a missing torchvision)
go through `logging`, in dfuse's format and at its level, never raw to the terminal. For the
processes dfuse owns: its workers (stages/worker.py), the CLI's run and serve, and bench/ (an
`Engine` in someone's program leaves their logging alone)."""

from __future__ import annotations

import logging
import threading


def quiet_libraries() -> None:
    import diffusers
    import transformers

    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_default_handler()
        library.utils.logging.enable_propagation()
        library.utils.logging.disable_progress_bar()
    # huggingface_hub's own handler prints besides the root logger's (each message twice); its
    # download bar stays: a first download of a real model takes minutes.
    hub = logging.getLogger("huggingface_hub")
    for handler in list(hub.handlers):
        hub.removeHandler(handler)
    hub.setLevel(logging.ERROR)  # "Could not reach the Hub ... using the cached commit": expected offline
    hub.propagate = True
    logging.captureWarnings(True)
    # Pipelines build a (disabled) tqdm bar per call, and tqdm's default lock is a
    # multiprocessing semaphore the resource tracker reports as leaked when the engine exits.
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())

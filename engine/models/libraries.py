"""Quiet diffusers and transformers: loading bars and advice from N workers (or a benchmark's
in-process pipeline) would bury dfuse's own output. Shared by stages/worker.py and bench/, which
may both import engine.models."""

from __future__ import annotations

import os
import threading


def quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # dfuse loads local folders only; never a hub
    import diffusers
    import transformers

    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()
    # Pipelines build a (disabled) tqdm bar per call, and tqdm's default lock is a
    # multiprocessing semaphore the resource tracker reports as leaked when the engine exits.
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())

"""Where and how `dfuse bench ...` writes: the default --out, the atomic JSON writer, the
up-front check for matplotlib, its headless pyplot, and the one progress bar of a run.

A run without --out goes to ./dfuse-bench/ under the current working directory, never into
bench/results/: the committed results there are only rewritten by naming them with --out
(bench/results/README.md gives the commands).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

OUT_DIR = "./dfuse-bench"
INSTALL_MATPLOTLIB = "pip install matplotlib (or pip install -e '.[bench]')"


def default_out(name: str) -> str:
    """The default --out of a benchmark: ./dfuse-bench/NAME, relative to the working directory."""
    return f"{OUT_DIR}/{name}"


def write_json(out: Path, doc, indent: int = 2) -> None:
    """Write `doc` as JSON to `out` (its folder made if missing) through a hidden file beside it
    and a rename: an interrupted run never leaves a truncated result where the last good one was."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(doc, indent=indent) + "\n")
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)


def matplotlib_available() -> bool:
    from importlib.util import find_spec

    return find_spec("matplotlib") is not None


def require_matplotlib(option: str, *, skip_with: str | None = None) -> None:
    """Refuse before any work starts when `option` needs matplotlib and it is not installed."""
    if matplotlib_available():
        return
    message = f"{option} draws with matplotlib, which is not installed: {INSTALL_MATPLOTLIB}"
    if skip_with:
        message += f", or pass {skip_with} to skip the plots"
    raise click.UsageError(message + ".")


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (benchmarks run without a screen)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError(f"plots need matplotlib: {INSTALL_MATPLOTLIB}, or pass --no-plots") from None
    return plt


def progress_bar(total: int, desc: str):
    """A tqdm bar on stderr and its progress(label, done) callback: the bar shows what runs now
    (label) and counts each label's `done` once, however the run's phases report. Like every
    bench bar (disable=None), it is drawn on a terminal only: a log gets no carriage-return lines."""
    import sys

    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="req", file=sys.stderr, disable=None)
    seen: dict[str, int] = {}

    def progress(label: str, done: int) -> None:
        if label not in seen:
            bar.set_description(label, refresh=False)
        bar.update(done - seen.get(label, 0))
        seen[label] = done

    return bar, progress

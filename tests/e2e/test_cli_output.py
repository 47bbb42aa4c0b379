"""What `dfuse run` prints: start-up progress, one line per worker as it becomes ready; -q leaves
only the result line; --log-level reaches the workers too (they read DFUSE_LOG), and a negative
prompt that guidance would ignore gets one warning."""

import re
import subprocess
import sys

from PIL import Image

from process_utils import children_of, cmdline, wait_until


def _run(model_path, out, *flags):
    return subprocess.run(
        [sys.executable, "-m", "dfuse.cli", "run", "a fox", "--model", str(model_path), "--steps", "2",
         "--seed", "0", "--threads", "1", "--out", str(out), *flags],
        capture_output=True, text=True, timeout=180,
    )


def test_quiet_prints_only_the_wrote_line(model_path, tmp_path):
    out = tmp_path / "fox.png"
    run = _run(model_path, out, "-q")
    assert run.returncode == 0, run.stderr
    assert run.stdout == f"Wrote {out} (128x128, seed 0)\n"
    assert run.stderr == "", run.stderr  # no "Starting stage workers", no "Workers ready", no bar
    assert Image.open(out).size == (128, 128)


def test_log_level_and_dtype_reach_the_workers_and_an_unused_negative_prompt_is_said(model_path, tmp_path):
    out = tmp_path / "fox.png"
    run = _run(model_path, out, "--log-level", "info", "--dtype", "bfloat16",
               "--negative-prompt", "blurry", "--guidance-scale", "1")
    assert run.returncode == 0, run.stderr
    warnings = [line for line in run.stderr.splitlines() if line.startswith("Warning:")]
    assert warnings == ["Warning: --negative-prompt has no effect without guidance: --guidance-scale is 1 "
                        "(guidance is on when > 1)"]
    for worker in ("encoder#0", "dit#1", "decoder#2"):  # the workers log at the engine's level
        assert f"[{worker}] loaded bfloat16 weights on cpu" in run.stderr, run.stderr
    assert re.search(r"^dit worker 1 on cpu ready in [\d.]+ s \(\d/3\)$", run.stderr, re.MULTILINE), run.stderr
    assert run.stdout.startswith(f"Wrote {out} (128x128, seed 0)")
    assert Image.open(out).size == (128, 128)


def test_start_up_names_the_workers_then_each_one_as_it_becomes_ready(tmp_path):
    """With the synthetic model (no weights to load): the lines a person waiting sees, in order."""
    run = subprocess.run(
        [sys.executable, "-m", "dfuse.cli", "run", "a fox", "--model", "synthetic:encoder=1ms,dit=1ms,decoder=1ms",
         "--instances", "dit=2", "--threads", "1", "--out", str(tmp_path / "fox.png")],
        capture_output=True, text=True, timeout=180,
    )
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stderr.splitlines() if not line.startswith("still loading after")]  # if slow
    assert lines[0] == ("Starting stage workers: encoder worker 0 on cpu, dit worker 1 on cpu, dit worker 2 on cpu, "
                        "decoder worker 3 on cpu")
    ready = [re.fullmatch(r"(\w+ worker \d on cpu) ready in [\d.]+ s \((\d)/4\)", line) for line in lines[1:]]
    ready = [match.groups() for match in ready if match]
    assert sorted(name for name, _ in ready) == ["decoder worker 3 on cpu", "dit worker 1 on cpu", "dit worker 2 on cpu",
                                                 "encoder worker 0 on cpu"]  # each worker once
    assert [count for _, count in ready] == ["1", "2", "3", "4"]
    assert lines[len(ready) + 1].startswith("Workers ready in ")


def test_ctrl_c_while_workers_start_prints_one_line_and_exits_130(model_path, tmp_path):
    """Ctrl-C reaches the terminal's whole process group; workers still importing torch must not
    each print a KeyboardInterrupt traceback."""
    import os
    import select
    import signal

    process = subprocess.Popen(
        [sys.executable, "-m", "dfuse.cli", "run", "a fox", "--model", str(model_path), "--steps", "2",
         "--threads", "1", "--out", str(tmp_path / "fox.png")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        # As from a terminal: a test run started in the background inherits SIGINT ignored, and
        # Python then installs no KeyboardInterrupt handler in its children.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        ready, _, _ = select.select([process.stderr], [], [], 60)
        assert ready and process.stderr.readline().startswith("Starting stage workers")
        workers = lambda: [p for p in children_of(process.pid) if "worker_main" in cmdline(p)]  # noqa: E731
        assert wait_until(lambda: len(workers()) == 3, 60)  # started, still importing torch
        os.killpg(process.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the engine and its workers
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    # Start-up progress may name workers still loading (when slow); then one line for the Ctrl-C.
    lines = [line for line in err.splitlines()
             if line.strip() and "[transformers]" not in line and not line.startswith("still loading after")]
    assert process.returncode == 130, err
    assert lines == ["Interrupted: workers stopped, shared memory released."], err

"""The watchdog of the chaos tests' child processes (process_utils.run_watched): a child that
keeps making progress runs as long as it needs, however slow the machine; one that stops is
killed once it has been quiet longer than it said it could be."""
import textwrap

from process_utils import run_watched

SLOW_BUT_ALIVE = """
import sys, time
from process_utils import Heartbeat
beat = Heartbeat(sys.argv[1])
for step in range(8):  # 1.6 s in all, each step well inside the 1 s it allows itself
    beat(f"step {step}", 1.0)
    time.sleep(0.2)
print("done")
"""

STOPS_BEATING = """
import sys, time
from process_utils import Heartbeat
Heartbeat(sys.argv[1])("started", 0.5)
time.sleep(600)
"""


def _run(tmp_path, script: str, first_quiet_limit_s: float):
    path = tmp_path / "child.py"
    path.write_text(textwrap.dedent(script))
    heartbeat = tmp_path / "heartbeat.json"
    return run_watched(path, [str(heartbeat)], heartbeat, first_quiet_limit_s)


def test_a_child_that_keeps_making_progress_runs_past_any_single_quiet_limit(tmp_path):
    code, out, err, killed = _run(tmp_path, SLOW_BUT_ALIVE, first_quiet_limit_s=30)
    assert (code, out.strip(), killed) == (0, "done", None), err


def test_a_child_that_stops_making_progress_is_killed_saying_where_it_stopped(tmp_path):
    code, _, _, killed = _run(tmp_path, STOPS_BEATING, first_quiet_limit_s=30)
    assert code is None
    assert "no progress for 0.5 s" in killed and "done: started" in killed

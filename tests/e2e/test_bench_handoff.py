"""`dfuse bench handoff` runs every mechanism between real processes and leaves nothing behind: the
dfuse hop reads the value the producer wrote on every hop (the run fails otherwise), and each
mechanism reports its samples. No timing is asserted: speeds live in bench/results/."""

import json
import os

from click.testing import CliRunner

from dfuse.bench.handoff import MECHANISMS
from dfuse.cli import main
from process_utils import engine_segments


def test_handoff_runs_every_mechanism_and_leaves_no_segment(tmp_path):
    before = set(engine_segments(os.getpid()))  # ours only: other engines may run beside the test
    out = tmp_path / "handoff.json"
    result = CliRunner().invoke(main, ["bench", "handoff", "--sizes", "64KiB", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert {r["mechanism"] for r in report["results"]} == set(MECHANISMS)
    for row in report["results"]:
        assert row["bytes"] == 64 * 1024
        assert row["samples"] > 0 and 0 < row["p50_us"] <= row["p99_us"], row
    assert set(engine_segments(os.getpid())) <= before

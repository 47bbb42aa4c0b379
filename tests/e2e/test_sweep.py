"""`dfuse bench sweep` end to end: the CLI drives a synthetic sleep model open-loop through the
monolithic baseline and a static engine, every request completes with its own output, the JSON,
CSV and summary say so, and nothing outlives the run (processes, /dev/shm segments)."""

import csv
import json
import os

from process_utils import assert_every_request_served, run_sweep

MODEL = "synthetic:encoder=5ms,dit=20ms,decoder=10ms,mode=sleep"
SEED = 3  # the arrival trace


def test_sweep_cli_serves_every_request_of_mono_and_static(tmp_path):
    out = tmp_path / "sweep"
    code, raw, pid = run_sweep("--model", MODEL, "--rates", "8", "--trace", "shift", "--modes", "mono,static",
                               "--duration", "3", "--seed", str(SEED), "--quiet-wait", "0", "--drain-timeout", "60",
                               "--out", str(out), "--no-plots")
    output = raw.decode(errors="replace")
    assert code == 0, output
    assert b"\r" not in raw, "a progress bar drawn into a pipe (a log) instead of only on a terminal"

    doc = json.loads((out / "sweep.json").read_text())
    points = assert_every_request_served(doc, ["mono", "static"], "8")
    submitted = doc["trace"]["requests_per_rate"]["8"]
    for point in points:
        assert point["latency_p50_s"] > 0 and 0 <= point["slo_attainment"] <= 1
        assert set(point["by_kind"]) == {"few-step", "many-step", "large"}
    static = points[1]
    assert static["placement_end"] == {"encoder": 1, "dit": 1, "decoder": 1}
    placement = static["allocation"]["placement"]  # workers per role over time: one of each stage, no fused one
    assert {role: set(counts) for role, counts in placement.items()} == {
        "encoder": {1}, "dit": {1}, "decoder": {1}, "encoder+dit+decoder": {0}}
    assert set(doc["slo"]["slo_s"]) == {"few-step", "many-step", "large"}
    totals = doc["totals"]
    assert totals["leaked_processes"] == [] and totals["leaked_segments"] == [] and not totals["run_dir_left"]

    with open(out / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["mode"], r["completed"], r["failed"]) for r in rows] == [
        ("mono", str(submitted), "0"), ("static", str(submitted), "0")]
    assert "| static | 8 |" in (out / "summary.md").read_text()
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"dfuse_{pid}_")]

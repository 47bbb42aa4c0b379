"""The sweep's numbers from made-up request records, and its options refused before any process
starts (each error names the option and what it allows)."""

import pytest
from click.testing import CliRunner

from dfuse.bench.sweep.report import Record, summarize
from dfuse.cli import main

SYNTHETIC = "synthetic:encoder=5ms,dit=20ms,decoder=10ms,mode=sleep"


def test_summary_counts_failures_and_unfinished_requests_as_slo_misses():
    records = [
        Record("a", 0.0, 0.0, 1.0),  # 1.0 s: within its 2 s SLO
        Record("a", 1.0, 1.0, 4.0),  # 3.0 s: served, too late
        Record("b", 2.0, 2.0, 2.5),  # 0.5 s: within its 1 s SLO
        Record("b", 3.0, 3.0, 3.1, error="RuntimeError: boom"),
        Record("b", 4.0, 4.0, 9.0, error="unfinished: cancelled 5 s after the last arrival"),
    ]
    s = summarize(records, {"a": 2.0, "b": 1.0}, duration_s=5.0)
    assert (s["submitted"], s["completed"], s["failed"], s["unfinished"]) == (5, 3, 1, 1)
    assert s["slo_attainment"] == pytest.approx(2 / 5)
    assert s["throughput_rps"] == pytest.approx(3 / 4.0)  # completed / (start -> last completion)
    assert s["goodput_rps"] == pytest.approx(2 / 4.0)
    assert s["offered_rps"] == pytest.approx(1.0)
    assert s["latency_p50_s"] == pytest.approx(1.0) and s["latency_max_s"] == pytest.approx(3.0)
    assert s["by_kind"]["a"]["slo_attainment"] == pytest.approx(0.5)
    assert s["by_kind"]["b"] == {"submitted": 3, "completed": 1, "latency_p50_s": 0.5, "latency_p95_s": 0.5,
                                 "slo_attainment": pytest.approx(1 / 3, abs=1e-4)}
    assert s["errors"] == {"RuntimeError: boom": 1, "unfinished: cancelled 5 s after the last arrival": 1}


def test_a_point_where_nothing_was_served_has_no_percentiles():
    s = summarize([Record("a", 0.0, 0.0, 1.0, error="RuntimeError: x")], {"a": 1.0}, duration_s=1.0)
    assert s["completed"] == 0 and s["latency_p99_s"] is None and s["throughput_rps"] is None
    assert s["slo_attainment"] == 0.0


@pytest.mark.parametrize("args,option,says", [
    (["--rates", "1,fast"], "--rates", "like 1,2,4"),
    (["--rates", "2", "--modes", "mono,turbo"], "--modes", "allowed: mono, static, elastic"),
    (["--rates", "2", "--trace", "diurnal"], "--trace", "'poisson', 'bursty', 'shift'"),
    (["--rates", "2", "--instances", "dit=0"], "--instances", "instances.dit"),
    (["--rates", "2", "--instances", "vae=1"], "--instances", "stages encoder, dit, decoder"),
    (["--rates", "2", "--device", "tpu"], "--device", "'cpu', 'cuda' or 'cuda:N'"),
    (["--rates", "2", "--model", "/no/such/folder"], "--model", "neither a built-in model"),
    (["--rates", "2", "--size", "1000"], "--size", "height"),
    (["--rates", "2", "--trace", "shift", "--size", "768"], "--size", "'large' requests"),
    (["--rates", "2", "--duration", "0"], "--duration", "1<=x<=3600"),
])
def test_bad_options_are_refused_naming_the_option(args, option, says):
    model = [] if "--model" in args else ["--model", SYNTHETIC]
    result = CliRunner().invoke(main, ["bench", "sweep", *model, *args])
    assert result.exit_code == 2, result.output
    assert option in result.output and says in result.output, result.output

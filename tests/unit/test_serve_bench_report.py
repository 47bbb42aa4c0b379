"""`dfuse bench serve`'s numbers without a server: percentiles, SLO attainment, errors by status,
the overhead of one side over the other, the CSV's shape, reading an answer, and the traces'
requests (--requests exactly, the shift trace's sizes)."""

import csv
from pathlib import Path

import pytest
from click.testing import CliRunner

from dfuse.bench import serve_command, serve_http
from dfuse.bench.serve_command import RequestSpec, build_workloads, parse_size
from dfuse.bench.serve_http import read_answer
from dfuse.bench.serve_report import (OVERHEAD_COLUMNS, SUMMARY_COLUMNS, Record, error_class, overhead, overhead_rows,
                                      percentiles, summarize, summary_rows, write_csv)
from dfuse.cli import main


def served(latency_ms: float, done_s: float, kind: str = "base") -> Record:
    return Record(kind, arrival_s=done_s - latency_ms / 1000, submitted_s=done_s - latency_ms / 1000, done_s=done_s,
                  status=200)


def test_percentiles_interpolate_linearly_as_numpy_and_vllm_do():
    assert percentiles(list(range(1, 101))) == pytest.approx([50.5, 95.05, 99.01])
    assert percentiles([7.0]) == [7.0, 7.0, 7.0]
    assert percentiles([]) == [None, None, None]


def test_failures_are_counted_by_status_client_error_or_unfinished():
    records = [
        served(100, 1.0), served(200, 2.0), served(300, 3.0), served(400, 4.0),
        Record("base", 0.5, 0.5, 0.6, status=429, error="HTTP 429: queue full"),
        Record("base", 0.7, 0.7, 0.8, status=429, error="HTTP 429: queue full"),
        Record("base", 0.9, 0.9, 1.0, status=200, error="HTTP 200 with 0 image(s) for n=1"),
        Record("base", 1.1, 1.1, 1.2, error="ConnectError: connection refused"),
        Record("base", 1.3, 1.3, 9.0, error="unfinished: cancelled 5 s after the last arrival"),
    ]
    assert [error_class(r) for r in records] == [None] * 4 + ["429", "429", "bad_output", "ConnectError", "unfinished"]
    doc = summarize(records, duration_s=4.0, slo_ms={"base": 250.0})
    assert (doc["submitted"], doc["completed"], doc["failed"], doc["unfinished"]) == (9, 4, 4, 1)
    assert doc["errors_by_status"] == {"429": 2, "ConnectError": 1, "bad_output": 1, "unfinished": 1}
    assert doc["error_examples"]["429"] == "HTTP 429: queue full"
    # SLO attainment is over every request sent: the failed and unfinished ones are misses.
    assert doc["slo_attainment"] == pytest.approx(2 / 9, abs=1e-4)
    assert doc["latency_p50_ms"] == pytest.approx(250.0)
    assert doc["latency_mean_ms"] == pytest.approx(250.0) and doc["latency_max_ms"] == pytest.approx(400.0)
    # Served over the trace's start -> the last answer served (4 s), not the unfinished one's end.
    assert doc["span_s"] == 4.0 and doc["throughput_rps"] == 1.0 and doc["images_per_s"] == 1.0
    assert doc["goodput_rps"] == 0.5 and doc["offered_rps"] == 2.25


def test_a_run_without_an_slo_or_any_answer_reports_none_not_zero():
    doc = summarize([Record("base", 0.0, 0.0, None, error="unfinished: no outcome")], duration_s=1.0)
    assert doc["slo_attainment"] is None and doc["goodput_rps"] is None
    assert doc["latency_p50_ms"] is None and doc["throughput_rps"] is None and doc["completed"] == 0


def test_the_shift_trace_reports_each_kind():
    records = [served(100, 1.0, "few-step"), served(300, 2.0, "many-step"), served(500, 3.0, "many-step")]
    doc = summarize(records, 3.0, {"few-step": 150.0, "many-step": 400.0})
    assert doc["by_kind"]["many-step"] == {"submitted": 2, "completed": 2, "latency_p50_ms": 400.0,
                                           "latency_p95_ms": 490.0, "slo_attainment": 0.5}
    assert "by_kind" not in summarize(records[:1], 1.0)


def test_overhead_is_the_difference_of_percentiles_and_of_the_same_requests():
    engine = [served(100, 1), served(200, 2), served(300, 3), served(400, 4)]
    http = [served(103, 1), served(205, 2), Record("base", 0, 0, None, error="unfinished: x"), served(401, 4)]
    result = overhead(http, engine)
    assert result["pairs"] == 3  # request 2 was not served over HTTP: not paired
    assert result["paired_median_overhead_ms"] == pytest.approx(3.0)
    assert result["p50_overhead_ms"] == pytest.approx(205 - 250)  # p50s of what each side served
    assert overhead([], engine)["p50_overhead_ms"] is None


def test_the_summary_csv_has_one_row_per_rate_and_the_documented_columns(tmp_path):
    points = [{"rate_rps": rate, **summarize([served(100, 1.0), Record("base", 0, 0, 0.1, status=503, error="x")],
                                             1.0, {"base": 1000.0})} for rate in (2.0, 4.0)]
    path = write_csv(tmp_path / "serve.csv", SUMMARY_COLUMNS, summary_rows({"config": {"trace": "bursty"},
                                                                           "points": points}))
    with open(path) as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == SUMMARY_COLUMNS
    assert len(rows) == 3 and all(len(r) == len(SUMMARY_COLUMNS) for r in rows)
    row = dict(zip(rows[0], rows[1]))
    assert (row["rate_rps"], row["trace"], row["submitted"], row["completed"], row["errors"]) == (
        "2.0", "bursty", "2", "1", "503:1")
    assert row["slo_attainment"] == "0.5"


def test_the_overhead_csv_has_a_row_per_phase_and_side_with_the_overhead_on_the_http_row(tmp_path):
    stats = summarize([served(100, 1.0)], 1.0)
    phases = [{"phase": name, "rate_rps": rate, "http": stats, "engine": stats, "overhead": overhead([], [])}
              for name, rate in (("isolated", None), ("2 req/s", 2.0))]
    path = write_csv(tmp_path / "o.csv", OVERHEAD_COLUMNS, overhead_rows({"phases": phases}))
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert [(r["phase"], r["side"]) for r in rows] == [("isolated", "http"), ("isolated", "engine"),
                                                        ("2 req/s", "http"), ("2 req/s", "engine")]
    assert rows[0]["rate_rps"] == "" and rows[2]["rate_rps"] == "2.0" and rows[0]["requests"] == "1"


@pytest.mark.parametrize("status,content,error", [
    (200, b'{"data": [{"b64_json": "AAAA"}], "size": "128x96"}', None),
    (200, b'{"data": [], "size": "128x96"}', "HTTP 200 with 0 image(s) for n=1"),
    (200, b'{"data": [{"b64_json": "AAAA"}], "size": "64x64"}', "HTTP 200 with size '64x64' for a 128x96 request"),
    (429, b'{"error": {"message": "queue full", "type": "rate_limit_error"}}', "HTTP 429: queue full"),
    (502, b"<html>bad gateway</html>", "HTTP 502: <html>bad gateway</html>"),
])
def test_an_answer_is_served_only_with_the_images_asked_for(status, content, error):
    answer = read_answer(status, content, n=1, size="128x96")
    assert answer.status == status and answer.error == error


def test_requests_gives_exactly_that_many_per_rate_with_their_own_seeds():
    for trace in ("poisson", "bursty", "shift"):
        workloads = build_workloads(trace, [2.0, 8.0], duration_s=None, requests=25, size=(96, 64), steps=4,
                                    guidance_scale=None, seed=1)
        for work in workloads:
            assert len(work.specs) == len(work.arrivals_s) == 25
            assert work.arrivals_s == sorted(work.arrivals_s) and work.arrivals_s[-1] <= work.duration_s
            assert [s.seed for s in work.specs] == [1234 + i for i in range(25)]


def test_the_shift_trace_scales_both_sides_of_a_non_square_size_and_needs_size_and_steps():
    (work,) = build_workloads("shift", [4.0], duration_s=30.0, requests=None, size=(96, 64), steps=8,
                              guidance_scale=None, seed=0)
    shapes = {s.kind: (s.width, s.height, s.steps) for s in work.specs}
    assert shapes == {"few-step": (96, 64, 2), "many-step": (96, 64, 16), "large": (192, 128, 4)}
    with pytest.raises(ValueError, match="--size and --steps"):
        build_workloads("shift", [4.0], duration_s=30.0, requests=None, size=None, steps=8, guidance_scale=None,
                        seed=0)


def test_a_request_leaves_unset_fields_to_the_server():
    spec = RequestSpec("base", "a cat", 7)
    assert spec.body() == {"prompt": "a cat", "n": 1, "response_format": "b64_json", "seed": 7}
    sized = RequestSpec("base", "a cat", 7, width=128, height=96, steps=2)
    assert sized.body("tiny-sd3")["size"] == "128x96" and sized.body("tiny-sd3")["model"] == "tiny-sd3"
    assert sized.engine_kwargs() == dict(prompt="a cat", seed=7, height=96, width=128, num_inference_steps=2,
                                         guidance_scale=None)


@pytest.mark.parametrize("text", ["128", "x128", "0x128", "128x", "axb", "128*128"])
def test_bad_sizes_are_refused(text):
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        parse_size(text)


def test_duration_and_requests_together_are_refused_before_any_request():
    result = CliRunner().invoke(main, ["bench", "serve", "--rates", "2", "--duration", "5", "--requests", "3"])
    assert result.exit_code == 2 and "--duration and --requests" in result.output


def test_serve_writes_under_dfuse_bench_by_default(monkeypatch, tmp_path):
    class Client:
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def get_json(self, path):
            return 200, {"data": []}

    result_doc = {"slo": {"slo_ms": {"base": 1.0}, "reference": "--slo-ms"},
                  "points": [{"rate_rps": 2.0, **summarize([served(100, 1.0)], 1.0, {"base": 1.0})}]}
    monkeypatch.setattr(serve_http, "wait_healthy", lambda url, timeout_s: {"status": "ok"})
    monkeypatch.setattr(serve_http, "HttpClient", Client)
    monkeypatch.setattr(serve_command, "run_serve_bench", lambda *a, **k: result_doc)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["bench", "serve", "--rates", "2", "--requests", "3", "--no-plots"])
    assert result.exit_code == 0, result.output
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.*")) == [
        Path("dfuse-bench/serve-poisson/serve.csv"), Path("dfuse-bench/serve-poisson/serve.json")]


def test_an_unreachable_server_is_a_clear_error_not_a_traceback(monkeypatch, tmp_path):
    def unreachable(url, timeout_s):
        raise RuntimeError(f"the server at {url} was not healthy within {timeout_s:g} s (last: ConnectError)")

    monkeypatch.setattr(serve_http, "wait_healthy", unreachable)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["bench", "serve", "--rates", "2", "--requests", "3", "--no-plots",
                                       "--url", "http://127.0.0.1:9", "--wait-ready", "0"])
    assert result.exit_code == 1 and "not healthy" in result.output and "dfuse serve --model" in result.output
    assert not list(tmp_path.rglob("*.json"))
    assert isinstance(result.exception, SystemExit)


def test_the_quiet_pairs_of_the_isolated_phase_are_those_a_neighbour_left_alone():
    from dfuse.bench.serve_overhead import quiet_pairs

    records = {"http": [served(105, 1), served(300, 2), served(107, 3)],
               "engine": [served(100, 1), served(150, 2), served(104, 3)]}
    quiet = quiet_pairs(records, [0.02, 0.9, None])  # pair 1 had a busy neighbour; pair 2 was not measured
    assert (quiet["pairs"], quiet["of"]) == (1, 3)
    assert quiet["paired_median_overhead_ms"] == pytest.approx(5.0) and quiet["http_latency_p50_ms"] == 105.0

"""`dfuse bench serve` and `dfuse bench serve-overhead` end to end: a real `dfuse serve` on
127.0.0.1 (port 0) on a synthetic sleep model, a handful of open-loop requests, and the JSON and
CSV say that every request was answered. The server is always stopped (SIGTERM, then wait)."""

import csv
import json
import subprocess
import sys

from dfuse.bench.serve_http import ServerProcess

MODEL = "synthetic:encoder=5ms,dit=20ms,decoder=10ms,mode=sleep"
BENCH = [sys.executable, "-c", "from dfuse.cli import main; main()", "bench"]


def run_bench(args: list[str], timeout_s: float) -> str:
    process = subprocess.Popen(BENCH + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = process.communicate(timeout=timeout_s)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, output
    return output


def test_bench_serve_answers_every_request_of_a_short_trace(tmp_path):
    server = ServerProcess(["--model", MODEL, "--grace-period", "5"])
    try:
        url = server.wait_ready(timeout_s=180)
        out = tmp_path / "serve"
        run_bench(["serve", "--url", url, "--rates", "4,8", "--trace", "bursty", "--requests", "6", "--size", "64x64",
                   "--steps", "2", "--drain-timeout", "60", "--request-timeout", "60", "--out", str(out),
                   "--no-plots"], timeout_s=240)
    finally:
        exit_code = server.stop(timeout_s=60)
    assert exit_code == 0, server.stderr_tail

    doc = json.loads((out / "serve.json").read_text())
    assert [p["rate_rps"] for p in doc["points"]] == [4.0, 8.0]
    for point in doc["points"]:
        assert point["submitted"] == point["completed"] == 6, point["error_examples"]
        assert point["errors_by_status"] == {} and point["unfinished"] == 0
        assert point["requests"]["status"] == [200] * 6
        assert all(x > 0 for x in point["requests"]["latency_ms"])
        assert point["latency_p50_ms"] <= point["latency_p95_ms"] <= point["latency_p99_ms"]
        assert 0 <= point["slo_attainment"] <= 1 and point["images_per_s"] > 0
    assert set(doc["slo"]["isolated_latency_ms"]) == {"base"}
    with open(out / "serve.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["rate_rps"], r["completed"], r["errors"]) for r in rows] == [("4.0", "6", ""), ("8.0", "6", "")]


def test_serve_overhead_runs_both_sides_on_the_same_requests_and_leaves_nothing(tmp_path):
    out = tmp_path / "overhead"
    output = run_bench(["serve-overhead", "--model", MODEL, "--rates", "8", "--requests", "5", "--size", "64x64",
                        "--steps", "2", "--isolated", "4", "--rounds", "2", "--warmup", "1", "--quiet-wait", "0",
                        "--drain-timeout", "60", "--out", str(out), "--no-plots"], timeout_s=300)
    assert "target: isolated p50 overhead" in output

    doc = json.loads((out / "serve-overhead.json").read_text())
    assert [p["phase"] for p in doc["phases"]] == ["isolated", "8 req/s"]
    isolated, loaded = doc["phases"]
    assert isolated["http"]["completed"] == isolated["engine"]["completed"] == 4
    assert loaded["http"]["completed"] == loaded["engine"]["completed"] == 10  # 5 requests x 2 rounds
    assert loaded["overhead"]["pairs"] == 10 and len(loaded["requests"]["http"]) == 2
    assert doc["target"]["isolated_p50_overhead_ms"] == isolated["overhead"]["p50_overhead_ms"]
    assert doc["engine_leaks"] == {"leaked_processes": [], "leaked_segments": [], "run_dir_left": False}
    assert doc["server_exit_code"] == 0
    with open(out / "serve-overhead.csv") as f:
        assert [(r["phase"], r["side"]) for r in csv.DictReader(f)] == [
            ("isolated", "http"), ("isolated", "engine"), ("8 req/s", "http"), ("8 req/s", "engine")]

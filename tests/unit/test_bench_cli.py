"""`dfuse bench ...` options, without running a benchmark: where results go by default (never into
the committed bench/results/), every option has help, a missing matplotlib is refused before any
work, handoff sizes are printed in binary units, and the chaos report never prints a None recovery."""

from pathlib import Path
from types import SimpleNamespace

import click
import pytest
from click.testing import CliRunner

from dfuse.bench import chaos
from dfuse.bench.lib import outputs
from dfuse.bench.simulate import policy_comparison as simulation
from dfuse.bench.sweep import command as sweep
from dfuse.bench.sweep import report as sweep_report
from dfuse.bench.commands import bench
from dfuse.bench.handoff.command import format_size
from dfuse.cli import main

SYNTHETIC = "synthetic:encoder=5ms,dit=20ms,decoder=10ms,mode=sleep"


def test_every_bench_command_has_an_out_option_and_help_on_every_option():
    ctx = click.Context(bench)
    names = bench.list_commands(ctx)  # as `dfuse bench --help` lists them (subcommands load lazily)
    assert set(names) >= {"throughput", "handoff", "pipeline", "simulate", "chaos", "sweep", "batching", "dispatch",
                          "serve", "serve-overhead"}
    for name in names:
        command = bench.get_command(ctx, name)
        assert "out" in {p.name for p in command.params}, name
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help, f"dfuse bench {name} {param.opts[0]} has no help"


def test_simulate_writes_under_dfuse_bench_by_default(monkeypatch, tmp_path):
    doc = {"scenario": "wan-480p-8xa10g", "horizon_s": 3600.0, "runs": 1, "wall_s": 0.1}
    monkeypatch.setattr(simulation, "run_scenario", lambda *a, **k: doc)
    monkeypatch.setattr(simulation, "format_table", lambda d: "table")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["bench", "simulate", "--scenario", "wan-480p-8xa10g", "--policies", "static"])
    assert result.exit_code == 0, result.output
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob("*.json")] == [
        Path("dfuse-bench/simulate-wan-480p-8xa10g.json")]


def _stub_sweep(monkeypatch) -> list[Path]:
    written: list[Path] = []
    doc = {"totals": {"unfinished": 0, "failed": 0, "leaked_processes": [], "leaked_segments": [],
                      "run_dir_left": False}}
    monkeypatch.setattr(sweep, "run_sweep", lambda *a, **k: doc)
    monkeypatch.setattr(sweep_report, "write_outputs", lambda d, out, plots: written.append(out) or [])
    monkeypatch.setattr(sweep_report, "format_markdown", lambda d: "summary")
    return written


def test_simulate_plot_without_matplotlib_is_refused_before_simulating(monkeypatch):
    monkeypatch.setattr(outputs, "matplotlib_available", lambda: False)
    monkeypatch.setattr(simulation, "run_scenario", pytest.fail)  # must not start
    result = CliRunner().invoke(main, ["bench", "simulate", "--scenario", "wan-480p-8xa10g", "--plot", "x.png"])
    assert result.exit_code == 2, result.output
    assert "--plot" in result.output and "pip install matplotlib" in result.output


def test_sweep_plots_without_matplotlib_is_refused_up_front_naming_no_plots(monkeypatch):
    monkeypatch.setattr(outputs, "matplotlib_available", lambda: False)
    monkeypatch.setattr(sweep, "run_sweep", pytest.fail)  # must not start
    result = CliRunner().invoke(main, ["bench", "sweep", "--model", SYNTHETIC, "--rates", "2", "--plots"])
    assert result.exit_code == 2, result.output
    assert "--plots draws" in result.output and "--no-plots" in result.output and "pip install matplotlib" in result.output


def test_sweep_without_matplotlib_warns_before_it_starts_and_skips_the_plots(monkeypatch):
    monkeypatch.setattr(outputs, "matplotlib_available", lambda: False)
    written = _stub_sweep(monkeypatch)
    result = CliRunner().invoke(main, ["bench", "sweep", "--model", SYNTHETIC, "--rates", "2", "--out", "elsewhere"])
    assert result.exit_code == 0, result.output
    assert "skipping the plots" in result.output and written == [Path("elsewhere")]


def test_sweep_with_no_plots_runs_without_matplotlib(monkeypatch):
    monkeypatch.setattr(outputs, "matplotlib_available", lambda: False)
    written = _stub_sweep(monkeypatch)
    result = CliRunner().invoke(main, ["bench", "sweep", "--model", SYNTHETIC, "--rates", "2", "--no-plots",
                                       "--out", "elsewhere"])
    assert result.exit_code == 0, result.output
    assert written == [Path("elsewhere")]


@pytest.mark.parametrize("nbytes,text", [
    (64 * 2**10, "64 KiB"), (2**20, "1 MiB"), (16 * 2**20, "16 MiB"), (256 * 2**20, "256 MiB"),
    (3 * 2**29, "1.5 GiB"), (512, "512 B"),
])
def test_handoff_sizes_are_printed_in_binary_units(nbytes, text):
    assert format_size(nbytes) == text


@pytest.mark.parametrize("sizes", ["0KiB", "abc", "-1MiB", "1TB"])
def test_bad_handoff_sizes_are_refused_naming_the_option(sizes):
    result = CliRunner().invoke(main, ["bench", "handoff", "--sizes", sizes])
    assert result.exit_code == 2
    assert f"Error: --sizes: {sizes!r} is not a size" in result.output



@pytest.mark.parametrize("args,message", [
    (["--ray-address", "127.0.0.1:6390"], "--ray-address goes with --link tcp"),
    (["--link", "tcp", "--device", "cpu:1"], "--link tcp serves host pools"),
])
def test_handoff_link_options_that_do_not_go_together_are_refused_before_any_work(args, message):
    result = CliRunner().invoke(main, ["bench", "handoff", "--sizes", "64KiB", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output

def _chaos_doc(**changes) -> dict:
    doc = {"requests_served": 20, "requests_submitted": 20, "requests_failed": 0, "images_equal_to_no_kill_run": 20,
           "kills": 1, "kills_by_stage": {"encoder": 0, "dit": 1, "decoder": 0}, "kills_with_work_in_flight": 1,
           "restarts": 1, "recovery_s": {"n": 0, "p50": None, "max": None},
           "kill_to_ready_s": {"n": 0, "p50": None, "max": None}, "replacement_wait_s": 60.0,
           "replacements_not_ready": 1, "no_kill_wall_s": 1.0, "chaos_wall_s": 2.0, "chaos_over_no_kill_wall": 2.0,
           "startup_s": 3.0, "leaked_segments": [], "leaked_processes": [], "run_dir_left": False, "stalled": None}
    return doc | changes


def test_chaos_report_says_a_recovery_was_not_measured_instead_of_none():
    report = chaos.format_report(_chaos_doc())
    assert "None" not in report
    assert "not measured  (1 of 1 replacement(s) not ready within 60 s after the run ended)" in report
    measured = chaos.format_report(_chaos_doc(recovery_s={"n": 1, "p50": 3.7, "max": 3.7},
                                              kill_to_ready_s={"n": 1, "p50": 3.9, "max": 3.9},
                                              replacements_not_ready=0))
    assert "p50 3.7 s  max 3.7 s  (n=1)" in measured and "not ready" not in measured
    none = chaos.format_report(_chaos_doc(kills=0, restarts=0, replacements_not_ready=0))
    assert "None" not in none and "no worker was restarted" in none


def test_chaos_with_other_faults_passes_a_run_where_requests_failed_with_a_reason_only_if_it_serves_on():
    failed = dict(requests_served=18, requests_failed=2, images_equal_to_no_kill_run=18)
    assert not chaos.passed(_chaos_doc(**failed))  # SIGKILLs alone: every request must be served
    faults = dict(faults=["kill", "load-kill"], faults_by_kind={"kill": 1, "load-kill": 1}, serving_at_end=True)
    assert chaos.passed(_chaos_doc(**failed, **faults))
    assert not chaos.passed(_chaos_doc(**failed, **faults | {"serving_at_end": False}))
    assert not chaos.passed(_chaos_doc(**failed | {"images_equal_to_no_kill_run": 17}, **faults))
    assert not chaos.passed(_chaos_doc(**failed | {"requests_failed": 1}, **faults))  # one request lost
    report = chaos.format_report(_chaos_doc(**failed, **faults))
    assert "faults injected               {'kill': 1, 'load-kill': 1}; serving at the end: True" in report


def test_an_unknown_fault_is_refused_naming_the_option():
    result = CliRunner().invoke(main, ["bench", "chaos", "--faults", "kill,meteor"])
    assert result.exit_code == 2 and "--faults: unknown meteor" in result.output


class _LoadingEngine:
    """stats() of an engine whose killed worker 1 (pid 10) is replaced by pid 11, ready on the 3rd look."""

    def __init__(self):
        self.looks = 0

    def stats(self):
        self.looks += 1
        ready = self.looks >= 3
        return SimpleNamespace(workers=[SimpleNamespace(id=0, pid=5, ready=True),
                                        SimpleNamespace(id=1, pid=11, ready=ready)])


def test_chaos_waits_for_a_replacement_still_loading_after_the_pass():
    run = chaos.ChaosPass(images=[], errors=[], started=0.0)
    run.kills.append(chaos.Kill(at_completed=10, worker_id=1, stage="dit", pid=10, inflight=1, at_s=0.0))
    assert chaos.await_replacements(_LoadingEngine(), run, timeout_s=10) == []
    assert run.kills[0].kill_to_ready_s is not None and 11 in run.worker_pids
    never = chaos.ChaosPass(images=[], errors=[], started=0.0)
    never.kills.append(chaos.Kill(at_completed=10, worker_id=1, stage="dit", pid=11, inflight=1, at_s=0.0))
    assert chaos.await_replacements(_LoadingEngine(), never, timeout_s=0.05) == never.kills  # pid 11 is the victim

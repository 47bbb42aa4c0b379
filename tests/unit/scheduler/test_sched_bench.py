"""`dfuse bench simulate`: the scenarios exist, the result has the issue's fields, targets are computed."""

import dataclasses
import json

from click.testing import CliRunner

from dfuse.bench.simulate.scenarios import SCENARIOS
from dfuse.bench.simulate.command import SCENARIO_NAMES, simulate
from dfuse.bench.simulate.policy_comparison import run_scenario, targets
from dfuse.scheduler.workloads import Phase


def test_every_scenario_is_offered_by_the_command():
    assert set(SCENARIO_NAMES) == set(SCENARIOS)
    assert {"wan-480p-8xa10g", "flux-1024-4xh100-4xl4", "sd35-shift-8xl40s"} <= set(SCENARIOS)


def test_a_short_scenario_produces_the_documented_json():
    base = SCENARIOS["sd35-shift-8xl40s"]
    short = dataclasses.replace(base, phases=tuple(Phase(p.name, 200.0, p.mix) for p in base.phases))
    doc = run_scenario(short, ("static", "elastic", "oracle", "monolithic", "auto"), loads=(0.5,))
    json.dumps(doc)  # plain data
    assert doc["scenario"] == base.name
    fields = {"policy", "throughput_rps", "p50_s", "p95_s", "p99_s", "slo_attainment", "max_rate_at_90pct",
              "usd_per_1k", "moves"}
    assert [r["policy"] for r in doc["results"]] == ["static", "elastic", "oracle", "monolithic", "auto"]
    # Alike devices, every weight fits: auto starts fused (its own planner's pick) and serves like monolithic.
    assert doc["controller"]["auto"]["initial_placement"] == "l40s: fused x8"
    assert doc["targets"]["auto_vs_best"]["ratio"] > 0.95
    assert all(fields <= set(r) for r in doc["results"])
    assert doc["results"][0]["moves"] == 0 and doc["results"][0]["throughput_rps"] > 0
    assert set(doc["targets"]) >= {"elastic_vs_oracle", "elastic_vs_static"}
    assert doc["planner_heuristic_vs_exact"]["cases"] > 0


def test_targets_are_computed_not_assumed():
    results = [{"policy": "static", "throughput_rps": 1.0, "work_per_s": 1.0},
               {"policy": "elastic", "throughput_rps": 1.2, "work_per_s": 1.5},
               {"policy": "threshold", "throughput_rps": 1.1, "work_per_s": 1.1},
               {"policy": "oracle", "throughput_rps": 1.3, "work_per_s": 1.6}]
    t = targets("x-shift", results)
    assert t["elastic_vs_oracle"]["met"] is False and round(t["elastic_vs_oracle"]["ratio"], 3) == 0.923
    assert t["elastic_vs_static"]["met"] is False and t["elastic_vs_threshold"]["met"] is True
    assert "auto_vs_best" not in t


def test_auto_is_compared_with_the_better_baseline_overall_and_per_phase():
    results = [{"policy": "monolithic", "throughput_rps": 1.0}, {"policy": "oracle", "throughput_rps": 1.1},
               {"policy": "auto", "throughput_rps": 1.2}]
    # Phase 1 favours monolithic, phase 2 the split: switching beats both.
    phases = {"monolithic": [2.0, 0.5], "oracle": [1.8, 0.7], "auto": [2.1, 0.69]}
    t = targets("x", results, phases, ["drafts", "renders"])
    assert round(t["auto_vs_best"]["ratio"], 3) == 1.091 and t["auto_vs_best"]["met"] is True
    rows = t["auto_by_phase"]["phases"]
    assert [(r["phase"], r["favours"], r["beats_both"]) for r in rows] == [("drafts", "monolithic", True),
                                                                           ("renders", "oracle", False)]
    assert t["auto_vs_both"]["met"] is True and round(t["auto_vs_both"]["ratio"], 3) == 1.091
    results[2]["throughput_rps"] = 1.07
    assert targets("x", results)["auto_vs_best"]["met"] is False  # 0.973 < 0.98


def test_the_command_rejects_unknown_policies():
    result = CliRunner().invoke(simulate, ["--scenario", "sd35-shift-8xl40s", "--policies", "static,magic"])
    assert result.exit_code == 2 and "magic" in result.output

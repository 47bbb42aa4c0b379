"""`dfuse bench sweep` on a device pool end to end: two one-core CPU devices, encoder and decoder
on one, the DiT on the other. The CLI drives a synthetic sleep model through the monolithic
baseline (one process per pool device, pinned to its core), a static engine on that placement and
the auto mode (the engine places the pool itself: fused on both devices); every request completes, the JSON records the placement per device over time, and nothing outlives
the run (processes, /dev/shm segments)."""

import json
import os


from process_utils import assert_every_request_served, run_sweep
from cpu_pool import A, B, CORES, NEEDS_TWO_CPUS

MODEL = "synthetic:encoder=5ms,dit=20ms,decoder=10ms,mode=sleep"
FUSED = "encoder+dit+decoder"
SEED = 5  # the arrival trace
pytestmark = NEEDS_TWO_CPUS


def test_sweep_on_a_device_pool_records_the_placement_per_device(tmp_path):
    out = tmp_path / "sweep"
    code, raw, pid = run_sweep("--model", MODEL, "--devices", f"{A},{B}", "--placement", f"{A}=encoder+decoder,{B}=dit",
                               "--modes", "mono,static,auto", "--rates", "8", "--duration", "3", "--seed", str(SEED),
                               "--quiet-wait", "0", "--drain-timeout", "60", "--out", str(out), "--no-plots")
    output = raw.decode(errors="replace")
    assert code == 0, output

    doc = json.loads((out / "sweep.json").read_text())
    placement = {A: ["encoder", "decoder"], B: ["dit"]}
    assert doc["config"]["devices"] == [A, B] and doc["config"]["placement"] == placement
    mono, static, auto = assert_every_request_served(doc, ["mono", "static", "auto"], "8")
    # the baseline: one process per pool device, each pinned to its device's core, one torch thread
    processes = doc["mono"]["processes"]
    assert [(p["device"], p["runs_on"], p["torch_threads"]) for p in processes] == [
        (A, [CORES[0]], 1), (B, [CORES[1]], 1)]
    assert set(mono["allocation"]["placement"]["mono"]) == {2}
    assert mono["allocation"]["devices"] == {A: [["mono"]] * len(mono["allocation"]["t_s"]),
                                             B: [["mono"]] * len(mono["allocation"]["t_s"])}

    # the engine on the placement: per device over time and at the end, per stage as before
    assert static["placement_end_devices"] == placement
    assert static["placement_end"] == {"encoder": 1, "dit": 1, "decoder": 1}
    samples = len(static["allocation"]["t_s"])
    assert static["allocation"]["devices"] == {A: [placement[A]] * samples, B: [placement[B]] * samples}
    assert set(static["allocation"]["placement"]) == {"encoder", "dit", "decoder", FUSED}  # workers per role
    # auto: the planner's placement on two alike devices with room, the whole pipeline fused on each
    assert auto["placement_end_devices"] == {A: [FUSED], B: [FUSED]}
    assert set(auto["allocation"]["placement"][FUSED]) == {2}

    summary = (out / "summary.md").read_text()
    assert f"device pool {A},{B}, placement {A}=encoder+decoder,{B}=dit" in summary
    assert f"on {A} pinned to CPU {CORES[0]}" in summary
    totals = doc["totals"]
    assert totals["leaked_processes"] == [] and totals["leaked_segments"] == [] and not totals["run_dir_left"]
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"dfuse_{pid}_")]

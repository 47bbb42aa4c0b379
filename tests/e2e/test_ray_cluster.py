"""An engine whose stage workers run on two or three Ray nodes (engine/cluster.py), each run sealed
in its own network and PID namespace (tests/ray_cluster.py: Ray must never reach the network).
The nodes share this machine, but the engine treats them as hosts apart: tensors cross between
them over TCP, control frames are signed. Every image must equal diffusers'; a worker SIGKILLed
on node b, or node b's raylet killed, loses no request the remaining nodes can serve."""

import json
import os

import numpy as np
import pytest

from dfuse.engine.transport.shm_files import list_segments
from process_utils import assert_every_request_served
from ray_cluster import RAY_SKIP_REASON, run_in_ray_namespace

pytestmark = [pytest.mark.slow, pytest.mark.skipif(RAY_SKIP_REASON is not None, reason=RAY_SKIP_REASON or "")]

CASES = [dict(prompt="a red fox in the snow", guidance_scale=4.5, height=64, width=64, seed=11),
         dict(prompt="a photo of a cat", negative_prompt="blurry", guidance_scale=1.0, height=64, width=96, seed=12)]

# Shared head of every script: the engine on the cluster the harness started, images saved by name.
PRELUDE = """
import json, os, signal, time
import numpy as np
from dfuse import Engine
ADDRESS, MODEL, OUT = os.environ["DFUSE_RAY_ADDRESS"], os.environ["MODEL"], os.environ["OUT"]
CASES = json.loads(os.environ["CASES"])

def engine(placement, **kw):
    return Engine(model=MODEL, cluster="ray", ray_address=ADDRESS, devices=list(placement), placement=placement, **kw)

def save(name, image):
    np.save(os.path.join(OUT, name + ".npy"), np.array(image))

def report(**fields):
    print("RESULT " + json.dumps(fields), flush=True)

def on_the_dit(e, steps_seen):  # submit CASES[0] with 30 steps; return once the DiT made steps_seen of them
    steps = []
    future = e.submit(num_inference_steps=30, on_progress=lambda stage, step, total: steps.append(step), **CASES[0])
    deadline = time.monotonic() + 120
    while len(steps) < steps_seen and time.monotonic() < deadline:
        time.sleep(0.01)
    return future, steps
"""


def _run(script: str, tmp_path, model_path, nodes=None, timeout=420):
    """Run `script` against a fresh cluster; its RESULT lines. Nothing it made may stay in /dev/shm
    (every node shares this machine's): not the engine's, not any agent's, whatever was killed."""
    env = {"MODEL": str(model_path), "OUT": str(tmp_path), "CASES": json.dumps(CASES)}
    before = set(list_segments())
    run = run_in_ray_namespace(PRELUDE + script, nodes=nodes, timeout=timeout, env=env)
    results = [json.loads(line.removeprefix("RESULT ")) for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    assert set(list_segments()) - before == set()
    return results


def _image(tmp_path, name):
    return np.load(os.path.join(tmp_path, name + ".npy"))


def test_two_nodes_serve_images_equal_to_diffusers_either_way_round(tmp_path, model_path, reference):
    script = """
try:  # a node name no node of the cluster has: refused up front, naming the nodes there are
    engine({"a/cpu:0": ["encoder", "decoder"], "z/cpu:1": ["dit"]})
except ValueError as error:
    report(error=str(error))
for name, placement in [("dit_on_b", {"a/cpu:0": ["encoder", "decoder"], "b/cpu:1": ["dit"]}),
                        ("ends_on_b", {"a/cpu:0": ["dit"], "b/cpu:1": ["encoder", "decoder"]})]:
    with engine(placement) as e:
        stats = e.stats()
        report(name=name, placement=stats.placement, links=stats.links,
               memory_gib={d.name: d.memory_gib for d in stats.devices})
        futures = [e.submit(num_inference_steps=2, **case) for case in CASES]
        for i, future in enumerate(futures):
            save(f"{name}{i}", future.result(timeout=300).images[0])
        report(name=name, completed=e.stats().completed, failed=e.stats().failed)
"""
    error, *results = _run(script, tmp_path, model_path)
    assert error == {"error": "devices: no live node of the Ray cluster has the dfuse-node label (or IP) 'z'; "
                              "nodes: ['a', 'b']"}
    memory = results[0].pop("memory_gib")
    assert memory["b/cpu:1"] == memory["a/cpu:0"] > 0, memory  # b's measured by its agent there (one machine here)
    assert results[0] == {"name": "dit_on_b", "placement": {"a/cpu:0": ["encoder", "decoder"], "b/cpu:1": ["dit"]},
                          "links": {"encoder->dit": "tcp", "dit->decoder": "tcp", "decoder->engine": "shm"}}
    assert results[2]["links"] == {"encoder->dit": "tcp", "dit->decoder": "tcp", "decoder->engine": "tcp"}
    for summary in (results[1], results[3]):
        assert (summary["completed"], summary["failed"]) == (len(CASES), 0), summary
    for name in ("dit_on_b", "ends_on_b"):
        for i, case in enumerate(CASES):
            assert np.array_equal(_image(tmp_path, f"{name}{i}"), reference(num_inference_steps=2, **case)), (name, i)


def test_forged_frames_on_the_cross_node_sockets_are_dropped_and_a_remote_workers_warning_reaches_the_engine(
        tmp_path, model_path, reference):
    script = """
import logging
import zmq
from dfuse.engine import protocol as wire
from dfuse.engine.transport.tcp import FrameSigner, new_secret

dropped, forwarded = [], []
class Count(logging.Handler):
    def emit(self, record):
        if "forged" in record.getMessage():
            dropped.append(record.getMessage())
        if record.name == "dfuse.worker":  # what a worker on node b logged, forwarded by it
            forwarded.append(record.getMessage())
logging.getLogger("dfuse.engine").addHandler(Count())
logging.getLogger("dfuse.worker").addHandler(Count())

with engine({"a/cpu:0": ["encoder", "decoder"], "b/cpu:1": ["dit"]}) as e:
    future, steps = on_the_dit(e, 2)
    # Request 0 is on the DiT on node b. A stranger on the network says it failed (unsigned, and
    # signed with another secret), and tells the DiT worker itself to cancel it.
    core, context, stranger = e._core, zmq.Context.instance(), FrameSigner(new_secret())
    results = context.socket(zmq.PUSH)
    results.connect(core._remote_results_address)
    for frame in (wire.encode(wire.StageFailed(1, 0, "forged")), stranger.sign(wire.encode(wire.StageFailed(1, 0, "forged")))):
        results.send(frame)
    tasks = context.socket(zmq.PUSH)
    tasks.connect(core.workers[1].socket.getsockopt_string(zmq.LAST_ENDPOINT))  # the DiT's own socket on node b
    tasks.send(stranger.sign(wire.encode(wire.CancelTask(0))))
    tasks.send(wire.encode(wire.CancelTask(0)))
    results.close(linger=2000); tasks.close(linger=2000)
    save("forged", future.result(timeout=300).images[0])
    deadline = time.monotonic() + 10  # forwarded with the worker's next heartbeat
    while not any("dropped a frame" in line for line in forwarded) and time.monotonic() < deadline:
        time.sleep(0.1)
    report(dropped=len(dropped), forwarded=forwarded, completed=e.stats().completed, failed=e.stats().failed,
           steps_before=len(steps))
"""
    (result,) = _run(script, tmp_path, model_path)
    # Either forged StageFailed would have failed the request: it completed, so both were dropped.
    # The log says so once (engine/transport/drop_log.py holds back repeats for 10 s).
    assert result["dropped"] == 1 and (result["completed"], result["failed"]) == (1, 0), result
    # The DiT on node b dropped the two forged cancels; its warning reached the engine's log.
    (line,) = [line for line in result["forwarded"] if "dropped a frame" in line]
    assert line.startswith("dit worker 1 on b/cpu:1: dfuse.worker: dropped a frame without the engine's signature"), line
    assert np.array_equal(_image(tmp_path, "forged"), reference(num_inference_steps=30, **CASES[0]))


def test_a_worker_killed_on_node_b_is_replaced_and_its_request_completes(tmp_path, model_path, reference):
    script = """
with engine({"a/cpu:0": ["encoder", "decoder"], "b/cpu:1": ["dit"]}) as e:
    future, steps = on_the_dit(e, 3)
    (dit,) = [w for w in e.stats().workers if w.stage == "dit"]
    os.kill(dit.pid, signal.SIGKILL)  # mid-request, on node b (one PID namespace for the whole cluster)
    save("after_kill", future.result(timeout=300).images[0])
    (replacement,) = [w for w in e.stats().workers if w.stage == "dit"]
    report(killed_at_step=len(steps), restarts=replacement.restarts, new_pid=replacement.pid != dit.pid)
"""
    (result,) = _run(script, tmp_path, model_path)
    assert result["killed_at_step"] >= 3 and result["restarts"] == 1 and result["new_pid"], result
    assert np.array_equal(_image(tmp_path, "after_kill"), reference(num_inference_steps=30, **CASES[0]))


def test_a_lost_node_s_requests_finish_on_the_others_the_last_loss_fails_clearly_and_a_node_may_come_back(
        tmp_path, model_path, reference):
    script = """
placement = {"a/cpu:0": ["encoder", "decoder"], "b/cpu:1": ["dit"], "c/cpu:1": ["dit"]}
raylets = json.loads(os.environ["DFUSE_RAYLET_PIDS"])
with engine(placement) as e:
    futures = [e.submit(num_inference_steps=8, **dict(CASES[i % 2], seed=30 + i)) for i in range(6)]
    time.sleep(0.5)
    os.kill(raylets["b"], signal.SIGKILL)  # node b leaves the cluster with its DiT
    for i, future in enumerate(futures):
        save(f"lost_b{i}", future.result(timeout=300).images[0])
    deadline = time.monotonic() + 60  # Ray declares a node dead after its missed health checks
    while not e.stats().lost_devices and time.monotonic() < deadline:
        time.sleep(0.2)
    report(lost=e.stats().lost_devices, completed=e.stats().completed)
    os.kill(raylets["c"], signal.SIGKILL)  # and now the last DiT
    time.sleep(1)
    try:
        e.generate(num_inference_steps=2, **CASES[0], timeout=120)
        report(error=None)
    except Exception as error:
        while len(e.stats().lost_devices) < 2 and time.monotonic() < deadline + 60:
            time.sleep(0.2)
        report(error=f"{type(error).__name__}: {error}", lost=e.stats().lost_devices)
    # Node b comes back (a new raylet, the same label): its DiT serves again, no engine restart.
    import subprocess
    started = subprocess.run(json.loads(os.environ["DFUSE_RAY_REJOIN"])["b"], capture_output=True, text=True)
    assert started.returncode == 0, started.stdout + started.stderr
    deadline = time.monotonic() + 120
    while not any(w.ready and w.device == "b/cpu:1" for w in e.stats().workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert any(w.ready and w.device == "b/cpu:1" for w in e.stats().workers), "node b's DiT did not come back"
    save("rejoined", e.generate(num_inference_steps=8, **CASES[1], timeout=120)[0])
    report(lost=e.stats().lost_devices)
"""
    results = _run(script, tmp_path, model_path, nodes={"a": 1, "b": 1, "c": 1})
    assert results[0] == {"lost": ["b/cpu:1"], "completed": 6}, results
    for i in range(6):
        case = dict(CASES[i % 2], seed=30 + i)
        assert np.array_equal(_image(tmp_path, f"lost_b{i}"), reference(num_inference_steps=8, **case)), i
    assert results[1]["error"].startswith("RequestFailed: no dit worker is ready"), results[1]
    assert "left the Ray cluster" in results[1]["error"], results[1]
    assert results[1]["lost"] == ["b/cpu:1", "c/cpu:1"]
    assert results[2] == {"lost": ["c/cpu:1"]}, results  # b is back
    assert np.array_equal(_image(tmp_path, "rejoined"), reference(num_inference_steps=8, **CASES[1]))


def test_a_node_with_no_worker_is_seen_to_leave_and_come_back_and_then_takes_a_stage(tmp_path, model_path, reference):
    script = """
raylets = json.loads(os.environ["DFUSE_RAYLET_PIDS"])
with Engine(model=MODEL, cluster="ray", ray_address=ADDRESS, devices=["a/cpu:0", "b/cpu:1"],
            placement={"a/cpu:0": ["encoder", "dit", "decoder"]}) as e:  # b/cpu:1 in the pool, idle
    os.kill(raylets["b"], signal.SIGKILL)  # node b leaves: no worker of the engine is there to notice
    deadline = time.monotonic() + 60
    while not e.stats().lost_devices and time.monotonic() < deadline:
        time.sleep(0.2)
    report(lost=e.stats().lost_devices)
    import subprocess
    started = subprocess.run(json.loads(os.environ["DFUSE_RAY_REJOIN"])["b"], capture_output=True, text=True)
    assert started.returncode == 0, started.stdout + started.stderr
    deadline = time.monotonic() + 60
    while e.stats().lost_devices and time.monotonic() < deadline:
        time.sleep(0.2)
    report(lost=e.stats().lost_devices)
    e.place({"a/cpu:0": ["encoder", "decoder"], "b/cpu:1": ["dit"]})  # the DiT to the node that came back
    deadline = time.monotonic() + 120
    while e.stats().placement != {"a/cpu:0": ["encoder", "decoder"], "b/cpu:1": ["dit"]}:
        assert time.monotonic() < deadline, e.stats().placement
        time.sleep(0.1)
    result = e.submit(num_inference_steps=4, **CASES[0]).result(timeout=120)
    save("on_b", result.images[0])
    report(dit_device=result.timings[0]["dit"].device)
"""
    results = _run(script, tmp_path, model_path)
    assert results[:2] == [{"lost": ["b/cpu:1"]}, {"lost": []}], results
    assert results[2] == {"dit_device": "b/cpu:1"}, results
    assert np.array_equal(_image(tmp_path, "on_b"), reference(num_inference_steps=4, **CASES[0]))


def test_the_elastic_policy_brings_the_stage_of_a_lost_node_to_the_nodes_left(tmp_path, model_path, reference):
    script = """
from dfuse.engine.config import EngineConfig
from dfuse.engine.elastic import ElasticConfig
raylets = json.loads(os.environ["DFUSE_RAYLET_PIDS"])
quick = ElasticConfig(interval_s=0.5, window_s=10, min_arrivals=5, confirm_s=1, dwell_s=1)
config = EngineConfig(model=MODEL, cluster="ray", ray_address=ADDRESS, devices=["a/cpu:0", "b/cpu:1"],
                      placement={"a/cpu:0": ["encoder", "decoder"], "b/cpu:1": ["dit"]}, policy="elastic", elastic=quick)
with Engine(config=config) as e:
    for future in [e.submit(num_inference_steps=2, **dict(CASES[0], seed=60 + i)) for i in range(6)]:
        future.result(timeout=120)  # every stage measured, the DiT on b
    os.kill(raylets["b"], signal.SIGKILL)  # node b leaves with the only DiT
    deadline = time.monotonic() + 60  # Ray declares a node dead after its missed health checks
    while not e.stats().lost_devices and time.monotonic() < deadline:
        time.sleep(0.2)
    failed, served, deadline = 0, None, time.monotonic() + 150
    for i in range(200):  # bounded: one request at a time until one is served on what is left
        if time.monotonic() > deadline:
            break
        try:
            result = e.submit(num_inference_steps=2, **dict(CASES[0], seed=70 + i)).result(timeout=60)
        except Exception:
            failed += 1  # while no DiT is ready anywhere: a clear failure, not a hang
            time.sleep(0.2)
            continue
        served = result
        save("after_loss", result.images[0])
        break
    report(served_on=served and served.timings[0]["dit"].device, seed=served and served.seeds[0],
           placement=e.stats().placement, lost=e.stats().lost_devices, failed_meanwhile=failed)
"""
    (result,) = _run(script, tmp_path, model_path)
    assert result["served_on"] == "a/cpu:0" and result["lost"] == ["b/cpu:1"], result
    case = dict(CASES[0], seed=result["seed"])
    assert np.array_equal(_image(tmp_path, "after_loss"), reference(num_inference_steps=2, **case))


def test_auto_placement_plans_over_the_nodes_with_their_memory_measured_there(tmp_path, model_path, reference):
    script = """
with Engine(model=MODEL, cluster="ray", ray_address=ADDRESS, devices=["a/cpu:0", "b/cpu:1"], placement="auto",
            policy="elastic") as e:
    results = [e.submit(num_inference_steps=4, **dict(CASES[i % 2], seed=80 + i)) for i in range(4)]
    for i, future in enumerate(results):
        save(f"auto{i}", future.result(timeout=300).images[0])
    report(placement=e.stats().placement, failed=e.stats().failed)
"""
    (result,) = _run(script, tmp_path, model_path)
    assert set(result["placement"]) == {"a/cpu:0", "b/cpu:1"} and result["failed"] == 0, result
    for i in range(4):
        case = dict(CASES[i % 2], seed=80 + i)
        assert np.array_equal(_image(tmp_path, f"auto{i}"), reference(num_inference_steps=4, **case)), i


def test_moves_across_nodes_lose_nothing_and_images_stay_equal(tmp_path, model_path, reference):
    script = """
with engine({"a/cpu:0": ["encoder", "decoder"], "b/cpu:1": ["dit"]}) as e:
    first = [e.submit(num_inference_steps=4, **dict(CASES[i % 2], seed=40 + i)) for i in range(4)]
    e.place({"a/cpu:0": ["fused"], "b/cpu:1": ["fused"]})  # under load: split -> fused on both nodes
    for i, future in enumerate(first):
        save(f"move{i}", future.result(timeout=300).images[0])
    deadline = time.monotonic() + 120
    while e.stats().placement != {"a/cpu:0": ["encoder+dit+decoder"], "b/cpu:1": ["encoder+dit+decoder"]}:
        assert time.monotonic() < deadline, e.stats().placement
        time.sleep(0.1)
    second = [e.submit(num_inference_steps=4, **dict(CASES[i % 2], seed=44 + i)) for i in range(4)]
    results = [f.result(timeout=300) for f in second]
    for i, result in enumerate(results):
        save(f"move{4 + i}", result.images[0])
    fused_workers = {r.timings[0]["dit"].worker_id for r in results}
    report(placement=e.stats().placement, completed=e.stats().completed, failed=e.stats().failed,
           fused_workers_used=len(fused_workers))
"""
    (result,) = _run(script, tmp_path, model_path)
    assert (result["completed"], result["failed"]) == (8, 0), result
    assert result["fused_workers_used"] == 2, result  # both nodes served whole requests
    for i in range(8):
        case = dict(CASES[i % 2], seed=40 + i)
        assert np.array_equal(_image(tmp_path, f"move{i}"), reference(num_inference_steps=4, **case)), i


def test_a_sweep_places_the_engine_over_the_cluster_and_runs_mono_on_this_host(tmp_path, model_path):
    script = """
import subprocess, sys
run = subprocess.run([sys.executable, "-m", "dfuse.cli", "bench", "sweep", "--model", "synthetic:encoder=5ms,dit=20ms,decoder=10ms,mode=sleep",
    "--cluster", "ray", "--ray-address", ADDRESS, "--devices", "a/cpu:0,b/cpu:1",
    "--placement", "auto", "--modes", "mono,static", "--rates", "8", "--duration", "3",
    "--quiet-wait", "0", "--drain-timeout", "60", "--no-plots", "--out", os.path.join(OUT, "sweep")],
    capture_output=True, text=True, timeout=400)
report(code=run.returncode, tail=(run.stdout + run.stderr)[-3000:])
"""
    (result,) = _run(script, tmp_path, model_path)
    assert result["code"] == 0, result["tail"]
    doc = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    mono, static = assert_every_request_served(doc, ["mono", "static"], "8")
    # Auto placement, each node's memory measured there: the engine's workers on both nodes.
    assert set(static["placement_end_devices"]) == {"a/cpu:0", "b/cpu:1"}, static["placement_end_devices"]
    assert [p["device"] for p in doc["mono"]["processes"]] == ["cpu:0", "cpu:1"]  # mono: here, without the nodes
    totals = doc["totals"]
    assert totals["leaked_processes"] == [] and totals["leaked_segments"] == [] and not totals["run_dir_left"]

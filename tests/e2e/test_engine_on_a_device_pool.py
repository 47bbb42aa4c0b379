"""An engine on a pool of two one-core CPU devices (this machine's stand-in for two small GPUs):
two stages on one device and one on the other, or one stage on both; every image equals
diffusers', and every worker runs on its device's core."""

import numpy as np

from dfuse import Engine

from process_utils import thread_cpus
from cpu_pool import A, B, NEEDS_TWO_CPUS

pytestmark = NEEDS_TWO_CPUS
CASES = [dict(prompt="a red fox in the snow", guidance_scale=4.5, height=64, width=64, seed=11),
         dict(prompt="a photo of a cat", negative_prompt="blurry", guidance_scale=1.0, height=64, width=96, seed=12)]


def test_two_stages_share_a_device_and_images_equal_diffusers(model_path, reference):
    placement = {A: ["encoder", "decoder"], B: ["dit"]}
    with Engine(model=str(model_path), devices=[A, B], placement=placement) as engine:
        stats = engine.stats()
        assert stats.placement == placement
        assert [(d.name, d.workers) for d in stats.devices] == [(A, [0, 2]), (B, [1])]
        for worker in stats.workers:  # pinned to exactly its device's core, each thread of it
            core = A if worker.stage != "dit" else B
            assert set(thread_cpus(worker.pid).values()) == {core.removeprefix("cpu:")}, worker
        for case in CASES:
            (image,) = engine.generate(num_inference_steps=2, **case)
            assert np.array_equal(np.array(image), reference(num_inference_steps=2, **case))


def test_one_stage_on_two_devices_serves_every_request_equal_to_diffusers(model_path, reference):
    placement = {A: ["encoder", "dit", "decoder"], B: ["dit"]}
    with Engine(model=str(model_path), devices=[A, B], placement=placement) as engine:
        cases = [dict(CASES[i % 2], seed=20 + i) for i in range(6)]
        futures = [engine.submit(num_inference_steps=2, **case) for case in cases]  # all queued at once
        results = [future.result(timeout=300) for future in futures]
        for case, result in zip(cases, results):
            assert np.array_equal(np.array(result.images[0]), reference(num_inference_steps=2, **case))
        dit_workers = {w.id for w in engine.stats().workers if w.stage == "dit"}
        assert {r.timings[0]["dit"].worker_id for r in results} == dit_workers  # both DiTs served
        assert engine.stats().placement == placement


def test_dfuse_run_takes_a_device_pool_and_reports_it(model_path, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "fox.png"
    run = subprocess.run(
        [sys.executable, "-m", "dfuse.cli", "run", "a red fox", "--model", str(model_path), "--devices", f"{A},{B}",
         "--placement", f"{A}=encoder+decoder,{B}=dit", "--steps", "2", "--height", "64", "--width", "64",
         "--seed", "11", "--out", str(out), "-v"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert f"Placement (static): {A}: encoder+decoder; {B}: dit" in run.stdout
    assert f"device {B}: 1 CPU core ({B.removeprefix('cpu:')})" in run.stdout
    assert out.exists()


def test_dfuse_run_on_a_pool_without_a_placement_lets_the_planner_place_every_stage_everywhere(
        model_path, reference, tmp_path):
    # Two alike devices with room for the whole model: the planner's optimum is every stage on
    # both (each device serves whole requests), as a monolithic deployment would run.
    import subprocess
    import sys

    from PIL import Image

    out = tmp_path / "fox.png"
    run = subprocess.run(
        [sys.executable, "-m", "dfuse.cli", "run", "a red fox in the snow", "--model", str(model_path),
         "--devices", f"{A},{B}", "--steps", "2", "--guidance-scale", "4.5", "--height", "64", "--width", "64",
         "--seed", "11", "--out", str(out), "-v"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert f"Placement (static): {A}: fused; {B}: fused" in run.stdout, run.stdout
    assert np.array_equal(np.array(Image.open(out).convert("RGB")), reference(num_inference_steps=2, **CASES[0]))

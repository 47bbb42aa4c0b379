"""The fused role: one worker holding the whole pipeline runs each request start to finish. Its
images equal diffusers' (guidance on and off, two families), a cancelled or timed-out request
stops at its next denoising step, a fused worker killed mid-request is replaced and the request
completes with the same image, an engine with a fused device beside a
split pipeline serves every request down both paths, and a pool moves between split and fused
roles under load without losing a request."""

import os
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from dfuse import Engine

from process_utils import wait_until
from cpu_pool import A, B, NEEDS_TWO_CPUS

FUSED = "encoder+dit+decoder"
pytestmark = NEEDS_TWO_CPUS
CASES = [dict(prompt="a red fox in the snow", guidance_scale=4.5, height=64, width=64, seed=11),
         dict(prompt="a photo of a cat", negative_prompt="blurry", guidance_scale=1.0, height=64, width=96, seed=12)]


def test_a_fused_worker_makes_diffusers_images_and_reports_every_stage(model_path, reference):
    with Engine(model=str(model_path), devices=[A], placement={A: [FUSED]}) as engine:
        stats = engine.stats()
        assert stats.placement == {A: [FUSED]}
        (worker,) = stats.workers
        assert worker.stage == FUSED
        for case in CASES:  # guidance on, then off
            result = engine.submit(num_inference_steps=2, **case).result(timeout=120)
            assert np.array_equal(np.array(result.images[0]), reference(num_inference_steps=2, **case)), case
            timings = result.timings[0]
            assert list(timings) == ["encoder", "dit", "decoder"]
            assert {t.worker_id for t in timings.values()} == {worker.id}
            assert all(t.compute_s > 0 and t.fused for t in timings.values())
            # The timeline: each stage ended where the next began, the decoder last.
            encoder, dit, decoder = timings.values()
            assert encoder.finished_at < dit.finished_at < decoder.finished_at
            assert abs(decoder.finished_at - dit.finished_at - decoder.compute_s) < 1e-6


def test_fused_flux_equals_diffusers_with_and_without_true_cfg():
    import diffusers

    from dfuse.engine.models.tiny import tiny_model_path

    path = tiny_model_path("tiny-flux")
    torch.set_num_threads(1)
    pipe = diffusers.FluxPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    cases = [dict(prompt="a red fox in the snow", guidance_scale=3.5, height=64, width=64, seed=0),
             dict(prompt="a photo of a cat", negative_prompt="blurry", true_cfg_scale=4.0, height=48, width=96, seed=2)]
    with Engine(model=str(path), devices=[A], placement={A: ["fused"]}) as engine:
        for case in cases:
            (image,) = engine.generate(num_inference_steps=2, timeout=120, **case)
            seed = case.pop("seed")
            expected = pipe(**case, num_inference_steps=2, generator=torch.Generator().manual_seed(seed)).images[0]
            assert np.array_equal(np.array(image), np.array(expected)), case


def test_a_fused_worker_killed_mid_request_is_replaced_and_the_request_completes(model_path, reference):
    case = dict(CASES[0], num_inference_steps=30)
    with Engine(model=str(model_path), devices=[A], placement={A: [FUSED]}) as engine:
        (worker,) = engine.stats().workers
        stepped = threading.Event()
        future = engine.submit(**case, on_progress=lambda stage, step, total: stepped.set())
        assert stepped.wait(60), "the fused worker never reported a denoising step"
        os.kill(worker.pid, signal.SIGKILL)
        result = future.result(timeout=120)
        assert np.array_equal(np.array(result.images[0]), reference(**case))
        replaced = engine.stats().workers[0]
        assert replaced.ready and replaced.pid != worker.pid and replaced.restarts == 1


def test_a_fused_worker_stops_a_cancelled_or_timed_out_request_and_serves_the_next(model_path, reference):
    from dfuse import RequestTimeout

    long = dict(CASES[0], num_inference_steps=400)  # minutes of denoising if nothing stopped it
    with Engine(model=str(model_path), devices=[A], placement={A: [FUSED]}) as engine:
        steps = []
        future = engine.submit(**long, on_progress=lambda stage, step, total: steps.append((stage, step)))
        assert wait_until(lambda: len(steps) >= 2, 60)
        assert steps[0][0] == "dit"  # progress is reported as the DiT's steps
        assert future.cancel()
        with pytest.raises(RequestTimeout):
            engine.generate(**dict(long, seed=13), timeout=1.0)
        (image,) = engine.generate(num_inference_steps=2, timeout=120, **CASES[1])  # served after both stopped
        assert np.array_equal(np.array(image), reference(num_inference_steps=2, **CASES[1]))
        assert max(step for _, step in steps) < 400
        assert wait_until(lambda: all(w.inflight == 0 for w in engine.stats().workers), 30)


def test_a_fused_device_beside_a_split_pipeline_serves_every_request_down_both(model_path, reference):
    placement = {A: [FUSED], B: ["encoder", "dit", "decoder"]}
    with Engine(model=str(model_path), devices=[A, B], placement=placement) as engine:
        assert engine.stats().placement == placement
        cases = [dict(CASES[i % 2], seed=30 + i) for i in range(8)]
        futures = [engine.submit(num_inference_steps=2, **case) for case in cases]  # all queued at once
        results = [future.result(timeout=300) for future in futures]
        for case, result in zip(cases, results):
            assert np.array_equal(np.array(result.images[0]), reference(num_inference_steps=2, **case)), case
        fused_id = next(w.id for w in engine.stats().workers if w.stage == FUSED)
        paths = {len({t.worker_id for t in r.timings[0].values()}) for r in results}
        assert paths == {1, 3}, "both the fused worker and the split pipeline should have served requests"
        assert any(r.timings[0]["dit"].worker_id == fused_id for r in results)


def test_a_pool_moves_from_split_to_fused_and_back_under_load_losing_nothing(model_path, reference):
    split = {A: ["encoder", "decoder"], B: ["dit"]}
    with Engine(model=str(model_path), devices=[A, B], placement=split) as engine:
        cases = [dict(CASES[i % 2], seed=40 + i) for i in range(12)]
        futures = [engine.submit(num_inference_steps=3, **case) for case in cases[:6]]
        engine.place({A: ["fused"], B: [FUSED]})
        assert wait_until(lambda: engine.stats().placement == {A: [FUSED], B: [FUSED]}
                          and all(w.ready for w in engine.stats().workers), 120), engine.stats().placement
        futures += [engine.submit(num_inference_steps=3, **case) for case in cases[6:9]]
        engine.place(split)
        futures += [engine.submit(num_inference_steps=3, **case) for case in cases[9:]]
        for case, future in zip(cases, futures):
            result = future.result(timeout=300)
            assert np.array_equal(np.array(result.images[0]), reference(num_inference_steps=3, **case)), case
        assert wait_until(lambda: engine.stats().placement == split, 120), engine.stats().placement
        assert {m.to_stage for m in engine.stats().moves} >= {FUSED, "dit", "encoder", "decoder"}


def test_dfuse_run_places_fused_workers_from_the_command_line(model_path, reference, tmp_path):
    from PIL import Image

    out = tmp_path / "fox.png"
    run = subprocess.run(
        [sys.executable, "-m", "dfuse.cli", "run", CASES[0]["prompt"], "--model", str(model_path),
         "--devices", f"{A},{B}", "--placement", f"{A}=fused,{B}=fused", "--steps", "2", "--height", "64",
         "--width", "64", "--guidance-scale", "4.5", "--seed", "11", "--out", str(out), "-v"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert f"{A}: fused; {B}: fused" in run.stdout, run.stdout
    assert np.array_equal(np.array(Image.open(out)), reference(num_inference_steps=2, **CASES[0]))

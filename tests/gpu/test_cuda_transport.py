"""CUDA IPC transport on a real GPU (skipped without CUDA): a tensor written by one process on a
copy stream is read intact by another through the producer's exported slot pool, and the engine
serves through GPU links. Run on a lent GPU machine: `pytest -q tests/gpu`."""

import os

import numpy as np
import pytest
import torch

from dfuse.bench.handoff.command import measure_dfuse

pytestmark = pytest.mark.gpu


def ipc_leftovers(pids) -> list[str]:
    """What exporting IPC handles puts in /dev/shm for these processes: the CUDA driver's file and
    torch's reference counts, both left behind when a worker exits or is killed."""
    own = {f"{pid:x}" for pid in pids}
    return [n for n in os.listdir("/dev/shm")
            if (n.startswith("cuda.shm.") and n.split(".")[3] in own) or
            (n.startswith("torch_") and n.split("_")[1] in {str(pid) for pid in pids})]


@pytest.mark.parametrize("nbytes", [64 * 2**10, 16 * 2**20, 256 * 2**20])
def test_tensor_written_on_a_copy_stream_is_read_by_another_process(nbytes):
    # The consumer checks every hop's value (the producer writes i % 251 on its copy stream
    # after the slot was handed back); a stale or torn read raises here.
    before = set(os.listdir("/dev/shm"))
    result = measure_dfuse(nbytes, iterations=20, device="cuda:0")
    assert result["samples"] == 20
    assert set(os.listdir("/dev/shm")) <= before  # the producer's IPC files went with it


def test_a_gpu_consumer_reads_a_cpu_producers_slot_through_pinned_memory():
    # The mixed link: the consumer pins the producer's /dev/shm pool and copies each tensor to its
    # GPU on its copy stream; it checks every hop's value there.
    result = measure_dfuse(16 * 2**20, iterations=20, device="cpu", consumer_device="cuda:0")
    assert result["samples"] == 20


def test_engine_with_only_the_dit_on_the_gpu_serves_through_host_slots():
    # Encoder and decoder on the CPU: the DiT reads its inputs from pinned host slots (H2D on its
    # copy stream) and writes its latents into a host slot (D2H). Stages on different devices
    # round differently (TF32 convolutions on the GPU, for one), so the images are compared with
    # diffusers' on the GPU up to that rounding: a stale, torn or misplaced tensor would differ
    # by far more, and every seed must give its own image.
    from diffusers import StableDiffusion3Pipeline

    from dfuse import Engine
    from dfuse.engine.models.tiny import tiny_model_path

    path = tiny_model_path()
    params = dict(num_inference_steps=4, guidance_scale=4.5, height=128, width=128)
    device = {"encoder": "cpu", "dit": "cuda:0", "decoder": "cpu"}
    with Engine(model=str(path), device=device, dtype="float32") as engine:
        assert engine.stats().links == {"encoder->dit": "shm", "dit->decoder": "shm", "decoder->engine": "shm"}
        futures = [engine.submit("a red fox in the snow", seed=s, **params) for s in range(3)]
        images = [np.array(f.result(timeout=300).images[0], dtype=np.int16) for f in futures]
    pipe = StableDiffusion3Pipeline.from_pretrained(path, dtype=torch.float32).to("cuda:0")
    for seed, image in enumerate(images):
        expected = pipe("a red fox in the snow", generator=torch.Generator().manual_seed(seed), **params).images[0]
        diff = np.abs(image - np.array(expected, dtype=np.int16))
        assert diff.mean() < 1.0, f"seed {seed}: mean |diff| {diff.mean():.3f}, max {diff.max()}"
    assert not np.array_equal(images[0], images[1]) and not np.array_equal(images[1], images[2])


def test_engine_on_one_gpu_uses_cuda_ipc_and_matches_diffusers():
    from diffusers import StableDiffusion3Pipeline

    from dfuse import Engine
    from dfuse.engine.models.tiny import tiny_model_path

    path = tiny_model_path()
    params = dict(num_inference_steps=4, guidance_scale=4.5, height=128, width=128)
    with Engine(model=str(path), device="cuda:0", dtype="float32") as engine:
        assert engine.stats().links == {"encoder->dit": "cuda_ipc", "dit->decoder": "cuda_ipc", "decoder->engine": "shm"}
        images = [engine.generate("a red fox in the snow", seed=s, **params)[0] for s in range(3)]
        producers = [w.pid for w in engine.stats().workers if w.stage in ("encoder", "dit")]
        assert len(ipc_leftovers(producers)) >= 2  # exporting their pools created them
    assert ipc_leftovers(producers) == []  # and the engine removed them with their workers
    pipe = StableDiffusion3Pipeline.from_pretrained(path, dtype=torch.float32).to("cuda:0")
    for seed, image in enumerate(images):
        expected = pipe("a red fox in the snow", generator=torch.Generator().manual_seed(seed), **params).images[0]
        assert np.array_equal(np.array(image), np.array(expected))


def test_requests_survive_a_gpu_producer_killed_while_consumers_hold_its_outputs():
    # The DiT's outputs live in its own GPU memory (cuda_ipc), so they die with it. Killed once it
    # has denoised the first request, the decoder still has or is about to get requests whose
    # latents were there: they start over from the encoder, and every image equals diffusers'.
    import os
    import signal
    import threading

    from diffusers import StableDiffusion3Pipeline

    from dfuse import Engine
    from dfuse.engine.models.tiny import tiny_model_path

    path = tiny_model_path()
    params = dict(num_inference_steps=4, guidance_scale=4.5, height=256, width=256)
    first_denoised = threading.Event()

    def on_progress(stage, step, total):
        if stage == "dit" and step == total:
            first_denoised.set()

    with Engine(model=str(path), device="cuda:0", dtype="float32") as engine:
        (dit,) = [w for w in engine.stats().workers if w.stage == "dit"]
        futures = [engine.submit("a red fox in the snow", seed=s, on_progress=on_progress, **params) for s in range(12)]
        assert first_denoised.wait(120)
        os.kill(dit.pid, signal.SIGKILL)
        images = [f.result(timeout=300).images[0] for f in futures]
        (dit_after,) = [w for w in engine.stats().workers if w.stage == "dit"]
        assert dit_after.restarts == 1
        assert ipc_leftovers([dit.pid]) == []
    pipe = StableDiffusion3Pipeline.from_pretrained(path, dtype=torch.float32).to("cuda:0")
    for seed, image in enumerate(images):
        expected = pipe("a red fox in the snow", generator=torch.Generator().manual_seed(seed), **params).images[0]
        assert np.array_equal(np.array(image), np.array(expected)), f"seed {seed}"


def test_an_elastic_engine_moves_gpu_workers_under_load_and_every_image_matches_diffusers():
    # policy="elastic": every output goes through pinned host memory ("host_staged", even on one
    # GPU), so GPU workers may switch stage in their own processes. One of two DiTs becomes a
    # second decoder while requests run, decodes some, then becomes a DiT again: nothing is
    # lost, every image equals diffusers' (host staging copies bytes exactly).
    import time

    from diffusers import StableDiffusion3Pipeline

    from dfuse import Engine
    from dfuse.engine.models.tiny import tiny_model_path

    path = tiny_model_path()
    params = dict(num_inference_steps=8, guidance_scale=4.5, height=256, width=256)

    def wait_for(engine, worker_id, stage):
        deadline = time.monotonic() + 120
        while not (engine.stats().workers[worker_id].stage == stage and engine.stats().workers[worker_id].ready):
            assert time.monotonic() < deadline, f"worker {worker_id} did not become a {stage} worker"
            time.sleep(0.05)

    with Engine(model=str(path), device="cuda:0", instances={"encoder": 1, "dit": 2, "decoder": 1}, dtype="float32",
                policy="elastic") as engine:
        assert engine.stats().links == {"encoder->dit": "host_staged", "dit->decoder": "host_staged",
                                        "decoder->engine": "shm"}
        # 18 requests in all: under the controller's min_arrivals (20), so only these moves happen.
        futures = [engine.submit("a red fox in the snow", seed=s, **params) for s in range(8)]
        mover = max(w.id for w in engine.stats().workers if w.stage == "dit")
        engine.move(mover, "decoder")  # with requests in flight on it
        wait_for(engine, mover, "decoder")
        futures += [engine.submit("a red fox in the snow", seed=s, **params) for s in range(8, 16)]
        assert all(f.result(timeout=300) for f in futures[8:])
        engine.move(mover, "dit")
        wait_for(engine, mover, "dit")
        futures += [engine.submit("a red fox in the snow", seed=s, **params) for s in range(16, 18)]
        results = [f.result(timeout=300) for f in futures]
        stats = engine.stats()
        assert stats.failed == 0 and [(m.worker, m.to_stage) for m in stats.moves] == [(mover, "decoder"), (mover, "dit")]
    decoded_by_mover = [r for r in results if r.timings[0]["decoder"].worker_id == mover]
    assert decoded_by_mover, "the moved worker decoded nothing"
    pipe = StableDiffusion3Pipeline.from_pretrained(path, dtype=torch.float32).to("cuda:0")
    for seed, result in enumerate(results):
        expected = pipe("a red fox in the snow", generator=torch.Generator().manual_seed(seed), **params).images[0]
        assert np.array_equal(np.array(result.images[0]), np.array(expected)), f"seed {seed}"

"""Per-stage batching: batched dfuse output equals diffusers' pipeline called on the same batch
(prompt list + one generator per prompt), pixel for pixel; incompatible requests are not
batched and equal their unbatched reference; a batch whose worker dies still completes.

Batched and unbatched calls differ in the last bits on CPU (FACTS.md), so a batched request is
compared with diffusers run on exactly the batch dfuse ran (asserted from the timings: every
stage reports batch_size 2), never with a single-request reference. Both sides run torch with
one thread per process.
"""

import os
import signal

import numpy as np
import pytest
import torch
from process_utils import wait_until

THREADS = 1
STEPS = 2
# max_batch 2 = the batches sent below: full batches go at once; the wait only guarantees that
# two requests submitted together meet at every stage (they arrive microseconds apart).
BATCHING = dict(enabled=True, max_batch=2, max_wait_ms=500)

# Per family: the pipeline class, the arguments its reference call fixes, and two batches of
# two requests (one submit each: same size, steps and guidance; prompt i gets seed + i).
FAMILIES = {
    "sd3": dict(model="tiny-sd3", pipeline="StableDiffusion3Pipeline", fixed={}, batches=[
        dict(prompt=["a red fox in the snow", "a photo of a cat"], negative_prompt=["blurry", ""],
             guidance_scale=4.5, height=64, width=64, seed=0),
        dict(prompt=["an astronaut riding a horse", "a dog"], guidance_scale=1.0, height=64, width=96, seed=5),
    ]),
    "flux": dict(model="tiny-flux", pipeline="FluxPipeline", fixed={}, batches=[
        dict(prompt=["a red fox in the snow", "a photo of a cat"], guidance_scale=3.5, height=64, width=64, seed=0),
        # True CFG: the negatives' second transformer pass, batched too.
        dict(prompt=["a photo of a cat", "a dog"], negative_prompt=["blurry", "ugly"], true_cfg_scale=4.0,
             height=48, width=96, seed=5),
    ]),
    "pixart": dict(model="tiny-pixart", pipeline="PixArtSigmaPipeline",
                   fixed=dict(use_resolution_binning=False, clean_caption=False), batches=[
        dict(prompt=["a red fox in the snow", "a photo of a cat"], negative_prompt=["blurry", ""],
             guidance_scale=4.5, height=64, width=64, seed=0),
        dict(prompt=["an astronaut riding a horse", "a dog"], guidance_scale=1.0, height=48, width=96, seed=5),
    ]),
    "wan": dict(model="tiny-wan", pipeline="WanPipeline", fixed=dict(output_type="pil"), batches=[
        dict(prompt=["a red fox in the snow", "a photo of a cat"], negative_prompt=["blurry", ""],
             guidance_scale=5.0, height=32, width=48, num_frames=5, seed=0),
        dict(prompt=["an astronaut riding a horse", "a dog"], guidance_scale=1.0, height=32, width=32,
             num_frames=9, seed=5),
    ]),
}


def _reference(pipe, fixed, prompt, seed, negative_prompt=None, **params) -> list[np.ndarray]:
    """diffusers' pipeline on the whole batch: a prompt list and one generator per prompt."""
    output = pipe(prompt=prompt, negative_prompt=negative_prompt, num_inference_steps=STEPS, **fixed, **params,
                  generator=[torch.Generator().manual_seed(seed + i) for i in range(len(prompt))])
    if hasattr(output, "frames"):  # video: per prompt, its frames stacked
        return [np.stack([np.array(frame) for frame in video]) for video in output.frames]
    return [np.array(image) for image in output.images]


def _outputs(result) -> list[np.ndarray]:
    if result.frames is not None:
        return [np.stack([np.array(frame) for frame in video]) for video in result.frames]
    return [np.array(image) for image in result.images]


def _engine(model, **batching):
    from dfuse import Engine
    from dfuse.engine.config import BatchConfig, EngineConfig

    return Engine(config=EngineConfig(model=model, cpu_threads=THREADS, batching=BatchConfig(**{**BATCHING, **batching})))


@pytest.fixture(scope="module", params=list(FAMILIES))
def served(request):
    import diffusers

    from dfuse.engine.models.tiny import tiny_model_path

    spec = FAMILIES[request.param]
    path = tiny_model_path(spec["model"])
    torch.set_num_threads(THREADS)
    pipe = getattr(diffusers, spec["pipeline"]).from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    with _engine(str(path)) as engine:
        yield request.param, spec, pipe, engine


@pytest.mark.parametrize("index", range(2))
def test_batch_equals_diffusers_on_the_same_batch(served, index):
    name, spec, pipe, engine = served
    case = spec["batches"][index]
    print(f"{name} batch {index}: {case}")
    result = engine.submit(num_inference_steps=STEPS, timeout=120, **case).result(timeout=120)
    for timing in result.timings:  # the two requests really ran as one call in every stage
        assert {stage: t.batch_size for stage, t in timing.items()} == {"encoder": 2, "dit": 2, "decoder": 2}
    expected = _reference(pipe, spec["fixed"], **case)
    for output, reference in zip(_outputs(result), expected):
        assert output.shape == reference.shape and np.array_equal(output, reference), case


def test_incompatible_requests_are_not_batched_and_equal_their_unbatched_reference(model_path, reference):
    """Different guidance (encoder), size (DiT, decoder): nothing can share a call."""
    cases = [dict(prompt="a red fox in the snow", guidance_scale=4.5, height=64, width=64, seed=11),
             dict(prompt="a photo of a cat", guidance_scale=1.0, height=64, width=96, seed=12)]
    with _engine(str(model_path)) as engine:
        futures = [engine.submit(num_inference_steps=STEPS, **case) for case in cases]
        results = [f.result(timeout=120) for f in futures]
        assert engine.stats().batched_tasks == {"encoder": 0, "dit": 0, "decoder": 0}
    for case, result in zip(cases, results):
        assert all(t.batch_size == 1 for t in result.timings[0].values())
        assert np.array_equal(np.array(result.images[0]), reference(num_inference_steps=STEPS, **case))


def _dit(engine) -> dict:
    (dit,) = [w for w in engine.stats().workers if w.stage == "dit"]
    return dit


def test_batch_whose_worker_is_killed_completes():
    """SIGKILL the DiT while it computes a batch of two: both are re-queued (each charged an
    attempt) and served alone by the replacement; each image is still its own."""
    with _engine("synthetic:encoder=1ms,dit=3s,decoder=1ms") as engine:
        future = engine.submit(["first", "second"], seed=40)
        assert wait_until(lambda: _dit(engine).inflight == 2, 30)
        os.kill(_dit(engine).pid, signal.SIGKILL)
        result = future.result(timeout=120)
        assert [image.getpixel((0, 0))[0] for image in result.images] == [40, 41]
        assert [t["dit"].batch_size for t in result.timings] == [1, 1]  # run alone after the death
        assert _dit(engine).restarts == 1


def test_poison_request_in_a_batch_fails_alone():
    """A request that kills its worker, batched with an innocent one: after the first death both
    run alone, so the innocent is served and the poison fails after max_attempts."""
    from dfuse.engine.engine import RequestFailed

    with _engine("synthetic:encoder=1ms,dit=200ms,decoder=1ms") as engine:
        poison = engine.submit("crash:dit", seed=50)
        innocent = engine.submit("innocent", seed=51)
        with pytest.raises(RequestFailed, match="dit"):
            poison.result(timeout=120)
        result = innocent.result(timeout=120)
        assert result.images[0].getpixel((0, 0))[0] == 51
        assert result.timings[0]["encoder"].batch_size == 2
        assert engine.stats().batched_tasks["dit"] == 1  # the batch that died; then each ran alone
        assert engine.submit("after", seed=60).result(timeout=120).images[0].getpixel((0, 0))[0] == 60

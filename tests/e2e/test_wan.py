"""Wan2.1 text-to-video: dfuse videos equal WanPipeline's own, frame for frame and pixel for pixel.

One engine (module-scoped), the tiny Wan model, 2 steps, small clips. Both sides run torch with
one thread per process (the condition for bit-identical outputs, FACTS.md).
"""

import json
import os
import subprocess
import sys

import msgspec
import numpy as np
import pytest
import torch

from process_utils import cpu_latency_request_allowed

THREADS = 1
STEPS = 2

# Two shapes and frame counts, guidance on (CFG: a second transformer pass with the negative
# prompt's embeddings, "" when none is given) and off.
CASES = [
    dict(prompt="a red fox in the snow", guidance_scale=5.0, height=32, width=48, num_frames=9, seed=0),
    dict(prompt="a red fox in the snow", guidance_scale=1.0, height=48, width=32, num_frames=5, seed=1),
    dict(prompt="a photo of a cat", negative_prompt="blurry", guidance_scale=4.0, height=32, width=32,
         num_frames=13, seed=2),
    dict(prompt="a photo of a cat", guidance_scale=5.0, height=64, width=48, num_frames=1, seed=3),  # one frame
]


class Reference:
    """WanPipeline.from_pretrained on the same folder: the frames it makes, as one uint8 array."""

    def __init__(self, path):
        from diffusers import WanPipeline

        torch.set_num_threads(THREADS)
        self.pipe = WanPipeline.from_pretrained(path)
        self.pipe.set_progress_bar_config(disable=True)
        self._cache = {}

    def __call__(self, seed, num_inference_steps=STEPS, **case) -> np.ndarray:
        key = json.dumps(dict(case, seed=seed, steps=num_inference_steps), sort_keys=True)
        if key not in self._cache:
            frames = self.pipe(**case, num_inference_steps=num_inference_steps, output_type="pil",
                               generator=torch.Generator().manual_seed(seed)).frames[0]
            self._cache[key] = np.stack([np.array(frame) for frame in frames])
        return self._cache[key]


@pytest.fixture(scope="module")
def wan_path():
    from dfuse.engine.models.tiny import tiny_model_path

    return tiny_model_path("tiny-wan")


@pytest.fixture(scope="module")
def reference(wan_path):
    return Reference(wan_path)


@pytest.fixture(scope="module")
def engine(wan_path):
    from dfuse import Engine

    with Engine(model=str(wan_path), cpu_threads=THREADS) as engine:
        yield engine


def _array(frames) -> np.ndarray:
    return np.stack([np.array(frame) for frame in frames])


@pytest.mark.parametrize("index", range(len(CASES)))
def test_video_equals_diffusers(engine, reference, index):
    case = CASES[index]
    print(f"wan case {index}: {case}")
    (frames,) = engine.generate(num_inference_steps=STEPS, timeout=120, **case)  # video models: frames
    assert len(frames) == case["num_frames"] and frames[0].size == (case["width"], case["height"])
    assert np.array_equal(_array(frames), reference(**case)), case


def test_the_result_holds_frames_per_prompt_and_first_frames_as_images(engine, reference):
    result = engine.submit(["a red fox", "a photo of a cat"], num_inference_steps=STEPS, height=32, width=32,
                           num_frames=5, seed=7).result(timeout=120)
    assert result.seeds == [7, 8] and [len(video) for video in result.frames] == [5, 5]
    for prompt, seed, video, image in zip(["a red fox", "a photo of a cat"], result.seeds, result.frames, result.images):
        expected = reference(prompt=prompt, height=32, width=32, num_frames=5, seed=seed)
        assert np.array_equal(_array(video), expected)
        assert np.array_equal(np.array(image), expected[0])


def test_guidance_and_frames_change_the_video(engine):
    """Guards the cases above: guidance on/off and the frame count really change the output."""
    base = dict(prompt="a photo of a cat", height=32, width=32, seed=9, num_inference_steps=STEPS, timeout=120)
    guided = _array(engine.generate(**base, guidance_scale=5.0, num_frames=5)[0])
    plain = _array(engine.generate(**base, guidance_scale=1.0, num_frames=5)[0])
    longer = _array(engine.generate(**base, guidance_scale=5.0, num_frames=9)[0])
    assert not np.array_equal(guided, plain) and longer.shape[0] == 9
    assert not np.array_equal(guided[0], guided[-1])  # the frames move


def test_many_requests_in_flight_each_equal_its_reference(engine, reference):
    cases = [dict(c, seed=20 + i, num_inference_steps=2 + i % 2) for i, c in enumerate(CASES * 2)]
    futures = [engine.submit(**c) for c in cases]  # all queued before the first completes
    for case, future in zip(cases, futures):
        result = future.result(timeout=120)
        assert result.seeds == [case["seed"]]
        assert np.array_equal(_array(result.frames[0]), reference(**case)), case
    assert engine.stats().family == "wan"


@pytest.mark.parametrize("bad, message", [
    (dict(num_frames=10), r"^num_frames: must be 4k\+1 in \[1, 1025\]"),
    (dict(num_frames=0), r"^num_frames: must be 4k\+1"),
    (dict(num_frames=2.5), r"^num_frames: must be an integer 4k\+1"),
    (dict(height=40), r"^height: must be a multiple of 16"),
    # 81 frames of 832 x 480 are 92.5 MiB of uint8 pixels: more than a 16 MiB transport slot.
    (dict(num_frames=81, height=480, width=832), r"^num_frames/height/width: a 81-frame 832x480 request makes "
                                                 r"92\.5 MiB of decoder outputs, more than one transport slot"),
])
def test_bad_video_requests_are_refused_naming_the_field_and_the_engine_keeps_serving(engine, reference, bad, message):
    request = dict(prompt="a red fox", num_inference_steps=STEPS, height=32, width=32, num_frames=5, seed=5) | bad
    with pytest.raises(ValueError, match=message):
        engine.submit(**request)
    (frames,) = engine.generate("a red fox", num_inference_steps=STEPS, height=32, width=32, num_frames=5, seed=5)
    assert np.array_equal(_array(frames), reference(prompt="a red fox", height=32, width=32, num_frames=5, seed=5))


def test_tiled_decode_equals_diffusers_with_vae_tiling_in_process(wan_path):
    """Memory admission may switch a decode to tiles: the decoder then equals WanPipeline with
    vae.enable_tiling() (tiles start above 256 px)."""
    from diffusers import WanPipeline

    from dfuse.engine.requests import build_requests
    from dfuse.engine.models import describe_model
    from dfuse.stages.families import load_family

    torch.set_num_threads(THREADS)
    family, info = load_family(wan_path), describe_model(wan_path)
    cpu = torch.device("cpu")
    dit, decoder = family.load_dit(wan_path, cpu, torch.float32), family.load_decoder(wan_path, cpu, torch.float32)
    encoder = family.load_encoder(wan_path, cpu, torch.float32)
    (params,) = build_requests(info, "a red fox", None, 1, 1.0, 288, 16, 3, num_frames=1)
    tiled = msgspec.structs.replace(params, vae_tiling=True)
    latents = family.denoise(dit, family.encode(encoder, tiled), tiled, lambda step, total: None)
    frames = family.decode(decoder, latents, tiled)["image"][0].numpy()
    pipe = WanPipeline.from_pretrained(wan_path)
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.enable_tiling()
    expected = pipe("a red fox", num_inference_steps=1, guidance_scale=1.0, height=288, width=16, num_frames=1,
                    output_type="pil", generator=torch.Generator().manual_seed(3)).frames[0]
    assert np.array_equal(frames, _array(expected))
    untiled = family.decode(decoder, latents, params)["image"][0].numpy()
    assert not np.array_equal(frames, untiled)  # the tiled path really ran


def test_dfuse_run_writes_a_video(wan_path, tmp_path):
    import imageio.v3 as iio

    out = tmp_path / "clip.mp4"
    run = subprocess.run(
        [sys.executable, "-m", "dfuse.cli", "run", "a red fox in the snow", "--model", str(wan_path),
         "--num-frames", "9", "--height", "32", "--width", "48", "--steps", "2", "--seed", "0",
         "--threads", "1", "--out", str(out), "-v"],
        capture_output=True, text=True, timeout=180,
    )
    assert run.returncode == 0, run.stderr
    assert "9 frames of 48x32" in run.stdout
    assert "Placement (static): cpu: encoder+dit+decoder" in run.stdout  # -v: the engine's stats, by device
    wake = "kept quick to wake (CPU latency request: 0 us)" if cpu_latency_request_allowed() else "as the OS sets them"
    assert f"Idle CPUs: {wake}" in run.stdout
    cores = len(os.sched_getaffinity(0))  # 3 workers x 1 thread (--threads 1): pinned where 3 cores are
    pinning = ("pinned, cores of their own: worker 0 on " if cores >= 3
               else f"left to the OS: 3 CPU workers x 1 thread(s) need more than the {cores} cores here")
    assert f"CPU workers: {pinning}" in run.stdout
    frames = iio.imread(out)  # imageio's ffmpeg plugin reads the H.264 file back
    assert frames.shape == (9, 32, 48, 3)


def test_dfuse_run_refuses_an_image_file_for_a_video_model(wan_path, tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "dfuse.cli", "run", "a fox", "--model", str(wan_path), "--out", str(tmp_path / "x.png")],
        capture_output=True, text=True, timeout=60,
    )
    assert run.returncode == 2 and "--out: the wan model makes videos" in run.stderr and ".mp4, .gif" in run.stderr
    assert not (tmp_path / "x.png").exists()

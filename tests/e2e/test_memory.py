"""Memory admission on the real engine: an image too big to decode whole is decoded in tiles
(and equals diffusers' own tiled decode), one too big even in tiles is refused before it runs,
and an out-of-memory inside a worker reaches the caller while the worker serves on."""

import numpy as np
import pytest
import torch

from dfuse import Engine
from dfuse.engine.config import EngineConfig
from dfuse.engine.state import RequestFailed

PARAMS = dict(num_inference_steps=2, guidance_scale=4.5, height=512, width=512)


def test_big_image_is_tiled_and_equals_diffusers_tiled_decode(model_path):
    from diffusers import StableDiffusion3Pipeline

    # 32 MiB for activations (estimates): the tiny VAE's 512 px decode needs ~200 MiB whole and
    # ~19 MiB in 128 px tiles; at 1024 px even the tiled decode needs ~38 MiB.
    config = EngineConfig(model=str(model_path), cpu_threads=1, memory_limit_gib={"cpu": 0.03})
    with Engine(config=config) as engine:
        (image,) = engine.generate("a red fox in the snow", seed=3, **PARAMS)
        with pytest.raises(ValueError, match="^height/width: a 1024x1024 request"):
            engine.generate("a red fox", seed=3, num_inference_steps=2, height=1024, width=1024)
    torch.set_num_threads(1)
    pipe = StableDiffusion3Pipeline.from_pretrained(model_path)
    pipe.vae.enable_tiling()
    expected = pipe("a red fox in the snow", generator=torch.Generator().manual_seed(3), **PARAMS).images[0]
    assert np.array_equal(np.array(image), np.array(expected))


def test_out_of_memory_in_a_worker_is_reported_and_the_worker_serves_on():
    with Engine(model="synthetic:encoder=1ms,dit=5ms,decoder=1ms", cpu_threads=1) as engine:
        pids = {w.stage: w.pid for w in engine.stats().workers}
        with pytest.raises(RequestFailed, match="out of memory on cpu in the decoder stage for a 64x64 request"):
            engine.generate("oom:decoder", seed=1)
        (image,) = engine.generate("fine", seed=2)
        assert image.getpixel((0, 0))[0] == 2
        assert {w.stage: w.pid for w in engine.stats().workers} == pids  # nobody restarted

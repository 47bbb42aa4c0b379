"""CUDA IPC transport on a real GPU (skipped without CUDA): a tensor written by one process on a
copy stream is read intact by another through the producer's exported slot pool, and the engine
serves through GPU links. Run on a lent GPU machine: `pytest -q tests/gpu`."""

import numpy as np
import pytest
import torch

from dfuse.bench.handoff import measure_dfuse

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("nbytes", [64 * 2**10, 16 * 2**20, 256 * 2**20])
def test_tensor_written_on_a_copy_stream_is_read_by_another_process(nbytes):
    # The consumer checks every hop's value (the producer writes i % 251 on its copy stream
    # after the slot was handed back); a stale or torn read raises here.
    result = measure_dfuse(nbytes, iterations=20, device="cuda:0")
    assert result["samples"] == 20


def test_engine_on_one_gpu_uses_cuda_ipc_and_matches_diffusers():
    from diffusers import StableDiffusion3Pipeline

    from dfuse import Engine
    from dfuse.stages.tiny import tiny_model_path

    path = tiny_model_path()
    params = dict(num_inference_steps=4, guidance_scale=4.5, height=128, width=128)
    with Engine(model=str(path), device="cuda:0", dtype="float32") as engine:
        assert engine.stats()["links"] == {"encoder->dit": "cuda_ipc", "dit->decoder": "cuda_ipc", "decoder->engine": "shm"}
        images = [engine.generate("a red fox in the snow", seed=s, **params)[0] for s in range(3)]
    pipe = StableDiffusion3Pipeline.from_pretrained(path, dtype=torch.float32).to("cuda:0")
    for seed, image in enumerate(images):
        expected = pipe("a red fox in the snow", generator=torch.Generator().manual_seed(seed), **params).images[0]
        assert np.array_equal(np.array(image), np.array(expected))

"""Fixtures for end-to-end tests: real stage processes on the tiny SD3 model, and diffusers' own
pipeline as the reference. Both sides run torch with one thread per process: equal thread counts
are the condition for bit-identical outputs (FACTS.md)."""

from pathlib import Path

import numpy as np
import pytest
import torch

THREADS = 1

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    # Every e2e test spawns stage processes or loads a model: `pytest -m "not slow"` is the
    # fast (unit) suite. The hook sees the whole session's items, so mark only ours.
    for item in items:
        if _HERE in item.path.parents:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def model_path() -> Path:
    from dfuse.engine.models.tiny import tiny_model_path

    return tiny_model_path("tiny-sd3")


@pytest.fixture(scope="session")
def reference(model_path):
    """reference(prompt, **params) -> the image diffusers' StableDiffusion3Pipeline makes, as an array."""
    from diffusers import StableDiffusion3Pipeline

    torch.set_num_threads(THREADS)
    pipe = StableDiffusion3Pipeline.from_pretrained(model_path)
    pipe.set_progress_bar_config(disable=True)
    cache = {}

    # Same defaults as the engine (diffusers' SD3 defaults, the tiny model's native size).
    def make(prompt, negative_prompt=None, num_inference_steps=28, guidance_scale=7.0, height=128, width=128, seed=0):
        key = (prompt, negative_prompt, num_inference_steps, guidance_scale, height, width, seed)
        if key not in cache:
            image = pipe(
                prompt, negative_prompt=negative_prompt, num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale, height=height, width=width,
                generator=torch.Generator().manual_seed(seed),
            ).images[0]
            cache[key] = np.array(image)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def engine(model_path):
    """One engine shared by the tests that only send requests (start-up costs seconds)."""
    from dfuse import Engine

    with Engine(model=str(model_path), cpu_threads=THREADS) as engine:
        yield engine


@pytest.fixture
def dfuse_server():
    """dfuse_server(*args, env=...) -> a healthy ServerProcess; every one is stopped after the test."""
    started = []

    from serve_process import ServerProcess

    def start(*args: str, env: dict | None = None, wait: bool = True) -> "ServerProcess":
        server = ServerProcess(list(args), env)
        started.append(server)
        if wait:
            server.wait_ready()
        return server

    yield start
    for server in started:
        server.stop()

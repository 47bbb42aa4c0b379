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


class ServerProcess:
    """A `dfuse serve` process on loopback: its URL, its stderr lines so far, and a bounded stop."""

    def __init__(self, args: list[str], env: dict | None = None, ready_s: float = 120.0):
        import os
        import re
        import subprocess
        import sys
        import threading

        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dfuse.cli", "serve", "--host", "127.0.0.1", "--port", "0", "--threads", str(THREADS),
             *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        listening = threading.Event()

        def read() -> None:
            for line in self.process.stderr:
                self.lines.append(line.rstrip())
                match = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
                if match:
                    self.url = match[1]
                    listening.set()

        threading.Thread(target=read, daemon=True).start()
        self.url = None
        if not listening.wait(ready_s):
            self.stop()
            raise RuntimeError("dfuse serve did not listen:\n" + "\n".join(self.lines))

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Until GET /health says ok (the workers loaded), bounded in time."""
        import time

        import httpx2 as httpx  # openai's HTTP client (the package is httpx2 now)

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "dfuse serve exited:\n" + "\n".join(self.lines)
            if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                return
            time.sleep(0.2)
        raise AssertionError("dfuse serve never became healthy:\n" + "\n".join(self.lines))

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, then wait for the exit (killed only past the timeout, which fails the test)."""
        import subprocess

        if self.process.poll() is None:
            self.process.terminate()
            try:
                return self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
                raise AssertionError("dfuse serve did not exit within its timeout after SIGTERM")
        return self.process.returncode


def serving(*args: str):
    """A healthy ServerProcess for a module-scoped fixture: `yield from serving("--model", ...)`."""
    server = ServerProcess(list(args))
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture
def dfuse_server():
    """dfuse_server(*args, env=...) -> a healthy ServerProcess; every one is stopped after the test."""
    started = []

    def start(*args: str, env: dict | None = None, wait: bool = True) -> ServerProcess:
        server = ServerProcess(list(args), env)
        started.append(server)
        if wait:
            server.wait_ready()
        return server

    yield start
    for server in started:
        server.stop()

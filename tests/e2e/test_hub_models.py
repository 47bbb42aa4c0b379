"""A Hugging Face repo id served end to end, offline, from a pre-populated HF cache (the hub's
stand-in here): the image equals diffusers' from the same weights, `variant` reaches the workers,
and resolving it prints no library chatter (huggingface_hub's offline notices, transformers'
torchvision advice) on the terminal."""

import os
import subprocess
import sys

import numpy as np
from PIL import Image

from dfuse import Engine
from hub_cache import add_repo

THREADS = 1  # as the reference pipeline (tests/e2e/conftest.py): the condition for equal bits


def test_dfuse_run_with_a_cached_repo_id_draws_what_diffusers_draws(model_path, reference, tmp_path):
    add_repo(tmp_path / "hub", "acme/tiny-sd3", model_path)
    out = tmp_path / "fox.png"
    run = subprocess.run(
        [sys.executable, "-m", "dfuse.cli", "run", "a fox", "--model", "acme/tiny-sd3", "--steps", "2", "--seed", "0",
         "--threads", str(THREADS), "--out", str(out)],
        capture_output=True, text=True, timeout=180,
        env=dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1"),
    )
    assert run.returncode == 0, run.stderr
    assert np.array_equal(np.array(Image.open(out)), reference("a fox", num_inference_steps=2, seed=0))
    for chatter in ("Hub", "torchvision", "[transformers]", "Traceback"):
        assert chatter not in run.stderr, run.stderr


def test_a_variant_is_what_every_worker_loads(model_path, reference, tmp_path, monkeypatch):
    add_repo(tmp_path / "hub", "acme/tiny-sd3-fp16", model_path, variant="fp16")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with Engine(model="acme/tiny-sd3-fp16", variant="fp16", cpu_threads=THREADS) as engine:
        (image,) = engine.generate("a fox", num_inference_steps=2, seed=0)
    assert np.array_equal(np.array(image), reference("a fox", num_inference_steps=2, seed=0))

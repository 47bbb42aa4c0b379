"""Shared test setup: offline hub, the gpu marker, and helpers to check nothing is left behind."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before diffusers/transformers are imported

import pytest


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)

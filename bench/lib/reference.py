"""diffusers' own pipeline for a model: the reference every benchmark's images are checked
against, and the monolithic baseline the engine is timed against."""

from __future__ import annotations


def load_pipeline(model_path, device: str = "cpu", dtype=None):
    """The family's diffusers pipeline (DiffusionPipeline picks it from model_index.json) on
    `device` (a torch device name), its progress bars and library chatter off."""
    from diffusers import DiffusionPipeline

    from ...engine.models.libraries import quiet_libraries

    quiet_libraries()
    pipe = DiffusionPipeline.from_pretrained(model_path, **({} if dtype is None else {"torch_dtype": dtype})).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, seed: int, **params):
    """One image, seeded as the engine seeds a request: a CPU torch.Generator, whatever the
    pipeline's device (stages/families/base.py)."""
    import torch

    return pipe(generator=torch.Generator("cpu").manual_seed(seed), **params).images[0]

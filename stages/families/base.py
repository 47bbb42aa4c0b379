"""What a model family must provide so the family-agnostic stages can serve it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ...engine.protocol import RequestParams

Tensors = dict[str, torch.Tensor]
OnStep = Callable[[int, int], None]  # (steps done, total steps)


@dataclass(frozen=True)
class ModelInfo:
    """Static facts about a model folder, read from its JSON configs (no weights loaded)."""

    path: Path | str  # a model folder, or a synthetic spec
    family: str
    pixel_multiple: int  # height and width must be multiples of this (VAE factor x patch size)
    default_size: int  # diffusers' default height and width for this model
    max_size: int  # largest height/width the transformer's position embedding covers
    num_inference_steps: int  # diffusers' default number of steps
    guidance_scale: float  # diffusers' default guidance scale
    dims: Mapping[str, int] = field(default_factory=dict)  # sizes the memory estimates need


class Family:
    """One model family (SD3, Flux ...): how each stage loads and runs its components.

    Subclasses reuse diffusers at its seams (encode_prompt, prompt_embeds=, vae.decode,
    VaeImageProcessor); they never re-implement a pipeline.
    """

    name: str
    pipeline_class: str

    def describe(self, path: Path) -> ModelInfo:
        raise NotImplementedError

    def peak_bytes(self, info: ModelInfo, stage: str, params: RequestParams, itemsize: int) -> int:
        """Estimated activation memory of `stage` for one request (weights excluded); 0 if unknown.
        With params.vae_tiling the decoder's estimate is that of a tiled decode."""
        return 0

    def supports_vae_tiling(self) -> bool:
        return False

    def load_encoder(self, path: Path, device: torch.device, dtype: torch.dtype) -> Any:
        raise NotImplementedError

    def encode(self, model: Any, params: RequestParams) -> Tensors:
        raise NotImplementedError

    def load_dit(self, path: Path, device: torch.device, dtype: torch.dtype) -> Any:
        raise NotImplementedError

    def denoise(self, model: Any, inputs: Tensors, params: RequestParams, on_step: OnStep) -> Tensors:
        raise NotImplementedError

    def load_decoder(self, path: Path, device: torch.device, dtype: torch.dtype) -> Any:
        raise NotImplementedError

    def decode(self, model: Any, inputs: Tensors, params: RequestParams) -> Tensors:
        """Return {"image": uint8 tensor (batch, height, width, channels)} on the CPU."""
        raise NotImplementedError


def read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)

"""What the engine knows of a model family without loading it: the model's static facts
(ModelInfo, read from its JSON configs), memory and slot estimates, and which requests may share
a stage call. The stage workers' families (stages/families/) extend these with loading and
running; the engine never imports them."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from ..protocol import RequestParams

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
    true_cfg: bool = False  # runs true CFG (true_cfg_scale > 1 with a negative prompt): Flux
    # Video families (Wan). Image families keep these defaults: one frame, num_frames must stay 1.
    video: bool = False
    default_shape: tuple[int, int] | None = None  # (height, width) where diffusers' default is not square (Wan)
    default_frames: int = 1  # diffusers' default num_frames
    frame_step: int = 1  # num_frames must be frame_step * k + 1 (the VAE's temporal factor)
    max_frames: int = 1

    @property
    def default_height_width(self) -> tuple[int, int]:
        return self.default_shape or (self.default_size, self.default_size)


class FamilySpec:
    """One model family (SD3, Flux ...) as the engine sees it: no weights, no torch."""

    name: str
    pipeline_class: str

    def describe(self, path: Path) -> ModelInfo:
        raise NotImplementedError

    def peak_bytes(self, info: ModelInfo, stage: str, params: RequestParams, itemsize: int) -> int:
        """Estimated activation memory of `stage` for one request (weights excluded); 0 if unknown.
        With params.vae_tiling the decoder's estimate is that of a tiled decode."""
        return 0

    def output_bytes(self, info: ModelInfo, stage: str, params: RequestParams, itemsize: int) -> int:
        """Bytes `stage` writes into its transport slot for one request; 0 if not known (the
        worker still refuses outputs that overflow the slot). Every family's decoder writes
        uint8 pixels: (1, height, width, 3), or (1, num_frames, height, width, 3) for video."""
        if stage != "decoder":
            return 0
        return slot_nbytes(params.num_frames * params.height * params.width * 3)

    def supports_vae_tiling(self) -> bool:
        return False

    def batch_key(self, stage: str, params: RequestParams):
        """Requests with equal keys may share one call of `stage` (None: never batched).

        One diffusers call takes one size, frame count, step count and guidance for its whole
        batch, so the DiT key holds them all (no step-level batching); the encoder needs to know
        only whether negatives are encoded; the decoder needs one latent shape, and never
        batches tiled decodes (admission tiled them because memory is short)."""
        if stage == "encoder":
            return (params.guidance_scale > 1, params.true_cfg_scale > 1 and params.negative_prompt is not None)
        if stage == "dit":
            true_cfg = params.true_cfg_scale if params.negative_prompt is not None else 1.0
            return (params.height, params.width, params.num_frames, params.num_inference_steps,
                    params.guidance_scale, true_cfg)
        return None if params.vae_tiling else (params.height, params.width, params.num_frames)


def slot_nbytes(*tensor_nbytes: int) -> int:
    """Bytes these tensors take in a transport slot, where each starts on an ALIGN boundary."""
    from ..transport.base import ALIGN  # lazily: transport imports torch, which the engine's front avoids

    return sum(-(-n // ALIGN) * ALIGN for n in tensor_nbytes)


# Activation estimates (not measurements): a handful of full-size maps live at once.
LIVE_MAPS_VAE = 6  # up-block resnets keep input, two norms/convs and the skip at full size
LIVE_MAPS_DIT = 12  # qkv, attention out, MLP (4x) and residuals per token


def image_peak_bytes(info: ModelInfo, stage: str, params: RequestParams, itemsize: int, *,
                     text_batch: int, dit_batch: int, joint_text: bool, latent_frames: int = 1,
                     vae_frames: int = 1) -> int:
    """The estimate SD3Spec.peak_bytes makes, for any image DiT + AutoencoderKL family, and
    for video DiTs with a frame-by-frame VAE (Wan).

    text_batch: prompts encoded per request (2 with a negative prompt in use); dit_batch: rows
    of one transformer forward (2 when CFG runs as one batch, 1 when its passes run one after
    the other); joint_text: the text tokens join the image tokens in the transformer's sequence
    (MMDiT) rather than only being attended to (cross-attention); latent_frames: frames of the
    latent video (each adds a frame of tokens); vae_frames: output frames whose full-size maps
    the VAE holds at once (Wan decodes one latent frame, i.e. up to 4 output frames, at a time).
    Needs dims text_tokens, text_width, dit_width, vae_factor, patch, vae_channels, vae_tile."""
    d, h, w = info.dims, params.height, params.width
    if stage == "encoder":
        return text_batch * d["text_tokens"] * d["text_width"] * LIVE_MAPS_DIT * itemsize
    if stage == "dit":
        tokens = latent_frames * (h // d["vae_factor"] // d["patch"]) * (w // d["vae_factor"] // d["patch"])
        tokens += d["text_tokens"] if joint_text else 0
        return dit_batch * tokens * d["dit_width"] * LIVE_MAPS_DIT * itemsize
    pixels_out = 3 * params.num_frames * h * w * 4  # float32 frames before the uint8 conversion
    if params.vae_tiling:  # one tile's maps, plus the decoded tiles and the blended image
        tile = min(d["vae_tile"], max(h, w))
        return LIVE_MAPS_VAE * d["vae_channels"] * vae_frames * tile * tile * itemsize + 2 * pixels_out
    return LIVE_MAPS_VAE * d["vae_channels"] * vae_frames * h * w * itemsize + pixels_out


def vae_dims(vae: dict) -> dict[str, int]:
    """The decoder's sizes for the estimates, from an AutoencoderKL config.json."""
    return {
        "vae_channels": vae["block_out_channels"][0],  # channels of the full-resolution maps
        "vae_tile": vae.get("sample_size", 1024),  # AutoencoderKL's tile_sample_min_size
        "vae_factor": 2 ** (len(vae["block_out_channels"]) - 1),
    }


MAX_JSON_BYTES = 1 << 20  # a model folder's JSON files are a few KiB


def read_json(path: Path) -> dict:
    """A model folder's JSON file; ValueError if it is not a regular file of at most
    MAX_JSON_BYTES holding JSON (a FIFO there would block start-up forever, a deeply nested
    document would raise RecursionError)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opens at once, then fails the check
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{path} is not a regular file")
        if info.st_size > MAX_JSON_BYTES:
            raise ValueError(f"{path} has {info.st_size} bytes, more than the {MAX_JSON_BYTES} a JSON config may have")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MAX_JSON_BYTES + 1)
    finally:
        os.close(fd)
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError(f"{path} is nested too deeply") from None

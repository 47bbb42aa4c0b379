"""What a model family must provide so the family-agnostic stages can serve it."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ...engine.protocol import RequestParams
from ..weights import pretrained

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

    # Batched entry points: one list entry per request, outputs split back per request. These
    # defaults run the requests one by one; families override them with one diffusers call.
    def encode_batch(self, model: Any, params: list[RequestParams]) -> list[Tensors]:
        return [self.encode(model, p) for p in params]

    def denoise_batch(self, model: Any, inputs: list[Tensors], params: list[RequestParams],
                      on_step: list[OnStep]) -> list[Tensors]:
        return [self.denoise(model, i, p, s) for i, p, s in zip(inputs, params, on_step)]

    def decode_batch(self, model: Any, inputs: list[Tensors], params: list[RequestParams]) -> list[Tensors]:
        return [self.decode(model, i, p) for i, p in zip(inputs, params)]

    def decode(self, model: Any, inputs: Tensors, params: RequestParams) -> Tensors:
        """Return {"image": uint8 tensor (batch, height, width, channels)} on the CPU; video
        families: (batch, frames, height, width, channels)."""
        raise NotImplementedError


def slot_nbytes(*tensor_nbytes: int) -> int:
    """Bytes these tensors take in a transport slot, where each starts on an ALIGN boundary."""
    from ...engine.transport.base import ALIGN

    return sum(-(-n // ALIGN) * ALIGN for n in tensor_nbytes)


# Activation estimates (not measurements): a handful of full-size maps live at once.
LIVE_MAPS_VAE = 6  # up-block resnets keep input, two norms/convs and the skip at full size
LIVE_MAPS_DIT = 12  # qkv, attention out, MLP (4x) and residuals per token


def image_peak_bytes(info: ModelInfo, stage: str, params: RequestParams, itemsize: int, *,
                     text_batch: int, dit_batch: int, joint_text: bool, latent_frames: int = 1,
                     vae_frames: int = 1) -> int:
    """The estimate SD3Family.peak_bytes makes, for any image DiT + AutoencoderKL family, and
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


def uint8_pixels(pixels) -> torch.Tensor:
    """VaeImageProcessor's float [0, 1] numpy images -> uint8, rounded as its numpy_to_pil does,
    so PIL images made from them equal diffusers' own."""
    import numpy as np

    return torch.from_numpy((pixels * 255).round().astype(np.uint8))


def load_dit_pipeline(pipeline_cls, path, device: torch.device, dtype: torch.dtype, drop: tuple[str, ...],
                      vae_factors: Mapping[str, int] | None = None):
    """The family's diffusers pipeline with only its transformer and scheduler (what `denoise`
    takes): text components in `drop` and the VAE are not loaded.

    vae_factors: the pipeline attributes holding the VAE's scale factors, and their values
    (default: `vae_scale_factor`, read from an AutoencoderKL config)."""
    pipe = pretrained(pipeline_cls, path, vae=None, dtype=dtype, **{name: None for name in drop})
    # Without a VAE a pipeline assumes a factor of 8 for the latent size: use the real one.
    if vae_factors is None:
        vae_factors = {"vae_scale_factor": vae_dims(read_json(Path(path) / "vae" / "config.json"))["vae_factor"]}
    for attribute, factor in vae_factors.items():
        setattr(pipe, attribute, factor)
    pipe.set_progress_bar_config(disable=True)
    # Schedulers keep state between calls (DPM-Solver keeps earlier model outputs): every
    # request starts from a copy of this one.
    return pipe.to(device), copy.deepcopy(pipe.scheduler)


def run_denoise(model, inputs: Tensors, params: RequestParams, on_step: OnStep, *, legacy_callback: bool = False,
                **family_kwargs) -> Tensors:
    """Drive the pipeline's own __call__ (its denoising loop, exactly) to latents.
    family_kwargs: the family's own __call__ arguments (e.g. Wan's num_frames)."""
    pipe, pristine_scheduler = model
    pipe.scheduler = copy.deepcopy(pristine_scheduler)
    total = params.num_inference_steps
    if legacy_callback:  # e.g. PixArt's pipeline: only the older callback(step, timestep, latents)
        progress = dict(callback=lambda step, _timestep, _latents: on_step(step + 1, total), callback_steps=1)
    else:
        def step_end(_pipe, index, _timestep, kwargs):
            on_step(index + 1, total)
            return kwargs

        progress = dict(callback_on_step_end=step_end)
    with torch.inference_mode():
        latents = pipe(
            **to_stage(inputs, pipe._execution_device, pipe.transformer.dtype),
            num_inference_steps=total,
            guidance_scale=params.guidance_scale,
            height=params.height,
            width=params.width,
            # A CPU generator, as in the diffusers reference: the same noise on every device.
            generator=torch.Generator("cpu").manual_seed(params.seed),
            output_type="latent",
            **progress,
            return_dict=False,  # a tuple: image pipelines name the output .images, video ones .frames
            **family_kwargs,
        )[0]
    return {"latents": latents}


def run_denoise_batch(model, inputs: list[Tensors], params: list[RequestParams], on_step: list[OnStep],
                      **family_kwargs) -> list[Tensors]:
    """`run_denoise` for requests of one batch key (same size, steps, guidance): one pipeline
    call on their concatenated embeddings, one CPU generator per request (diffusers draws each
    row's noise from its own generator, so row i starts from request i's noise)."""
    pipe, pristine_scheduler = model
    pipe.scheduler = copy.deepcopy(pristine_scheduler)
    first, total = params[0], params[0].num_inference_steps

    def step_end(_pipe, index, _timestep, kwargs):
        for report in on_step:
            report(index + 1, total)
        return kwargs

    if family_kwargs.pop("legacy_callback", False):
        progress = dict(callback=lambda step, _t, _l: step_end(None, step, None, None), callback_steps=1)
    else:
        progress = dict(callback_on_step_end=step_end)
    with torch.inference_mode():
        latents = pipe(
            **to_stage(concat(inputs), pipe._execution_device, pipe.transformer.dtype),
            num_inference_steps=total,
            guidance_scale=first.guidance_scale,
            height=first.height,
            width=first.width,
            generator=[torch.Generator("cpu").manual_seed(p.seed) for p in params],
            output_type="latent",
            **progress,
            return_dict=False,
            **family_kwargs,
        )[0]
    return split({"latents": latents}, len(params))


def concat(tensors: list[Tensors]) -> Tensors:
    """Per-request tensors (batch 1 each) -> one batch, name by name."""
    return {name: torch.cat([t[name] for t in tensors]) for name in tensors[0]}


def split(tensors: Tensors, n: int) -> list[Tensors]:
    """One batch's outputs -> per-request tensors (batch 1 each, views: the slot writer copies)."""
    return [{name: t[i:i + 1] for name, t in tensors.items()} for i in range(n)]


def set_vae_tiling(vae, tiled: bool) -> None:
    """The same switch as diffusers' `pipe.vae.enable_tiling()`: its tiled output, exactly."""
    if tiled:
        vae.enable_tiling()
    else:
        vae.disable_tiling()


def to_stage(tensors: Tensors, device: torch.device, dtype: torch.dtype) -> Tensors:
    """Inputs onto this stage's device; floating ones into its dtype too (the producing stage
    may run elsewhere, e.g. float32 on the CPU for a bf16 GPU stage). Masks keep their type."""
    return {n: t.to(device, dtype) if t.is_floating_point() else t.to(device) for n, t in tensors.items()}


def read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)

"""What a model family must provide so the family-agnostic stages can serve it: loading its
components and running them (engine/models/ holds what the engine reads without loading)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ...engine.models.base import FamilySpec, read_json, vae_dims
from ...engine.protocol import RequestParams
from ..weights import pretrained

Tensors = dict[str, torch.Tensor]
OnStep = Callable[[int, int], None]  # (steps done, total steps)


class Family(FamilySpec):
    """One model family (SD3, Flux ...): how each stage loads and runs its components. A
    family class derives from its spec (engine/models/), so it also answers what the spec does.

    Subclasses reuse diffusers at its seams (encode_prompt, prompt_embeds=, vae.decode,
    VaeImageProcessor); they never re-implement a pipeline.
    """

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

    def prompt_warnings(self, model: Any, params: RequestParams) -> list[str]:
        """What the request's caller should hear about its prompts, given the loaded encoder
        `model`: the part of a prompt a text encoder never reads (see `cut_prompts`)."""
        return []


TextEncoder = tuple[str, Any, int]  # (its name for users: CLIP, T5; its tokenizer; the tokens it reads)
SHOWN_CHARS = 100  # of a cut part: a 10,000-character prompt must not make a 10,000-character warning


def cut_prompts(prompts: Mapping[str, str | None], encoders: list[TextEncoder]) -> list[str]:
    """A warning for each prompt (named by what it is: "prompt", "negative prompt") that a text
    encoder reads only in part, naming the part cut off, as diffusers' pipelines warn (dfuse's
    workers silence the libraries' logs). The pipelines truncate to the encoder's length keeping
    its special tokens (CLIP: start and end, T5: end); the same count is made here."""
    warnings = []
    for name, tokenizer, limit in encoders:
        kept = limit - tokenizer.num_special_tokens_to_add()
        for which, text in prompts.items():
            ids = tokenizer(text, add_special_tokens=False).input_ids if text else []
            if len(ids) <= kept:
                continue
            cut = tokenizer.decode(ids[kept:])
            shown = json.dumps(cut if len(cut) <= SHOWN_CHARS else cut[:SHOWN_CHARS] + "...", ensure_ascii=False)
            warning = (f"the {which} is longer than {name}'s {limit} tokens; this part was cut "
                       f"({len(ids) - kept} tokens): {shown}")
            if warning not in warnings:  # SD3's two CLIP encoders cut the same part
                warnings.append(warning)
    return warnings


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


def run_denoise(model, inputs: Tensors, params: RequestParams, on_step: OnStep, **family_kwargs) -> Tensors:
    """One request: the batched call with a batch of one. The same bits as a single call:
    diffusers' randn_tensor takes a list of one generator as that generator."""
    return run_denoise_batch(model, [inputs], [params], [on_step], **family_kwargs)[0]


def run_denoise_batch(model, inputs: list[Tensors], params: list[RequestParams], on_step: list[OnStep],
                      **family_kwargs) -> list[Tensors]:
    """Drive the pipeline's own __call__ (its denoising loop, exactly) to latents, for requests of
    one batch key (same size, steps, guidance): one call on their concatenated embeddings, one
    CPU generator per request, as in the diffusers reference (diffusers draws each row's noise
    from its own generator, so row i starts from request i's noise, on every device).
    family_kwargs: the family's own __call__ arguments (e.g. Wan's num_frames); legacy_callback:
    the pipeline only has the older callback(step, timestep, latents) (e.g. PixArt's)."""
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
            return_dict=False,  # a tuple: image pipelines name the output .images, video ones .frames
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


"""Wan2.1 text-to-video (WanPipeline components), split into three stages.

encoder: UMT5 -> prompt embeddings (512 tokens, zero past each prompt's end); the negative
         prompt's too when guidance_scale > 1 ("" when none is given, as diffusers does).
dit:     WanTransformer3DModel + its scheduler (UniPC with flow sigmas in the released models),
         driven by the pipeline's own __call__ with prompt_embeds=, num_frames= and
         output_type="latent". Wan runs CFG as two transformer passes one after the other
         (cond, then uncond), not as one batch. Output: float32 latents
         (1, z_dim, (num_frames - 1) / 4 + 1, height / 8, width / 8).
decoder: AutoencoderKLWan (causal 3D, decodes one latent frame at a time): un-normalise with
         the VAE's latents_mean/std, vae.decode, VideoProcessor -> uint8 frames
         (1, num_frames, height, width, 3), exactly as WanPipeline does after its loop.

Loading WanTransformer3DModel needs `accelerate`: the model keeps some modules in float32
(`_keep_in_fp32_modules`), and diffusers 0.42 then insists on low_cpu_mem_usage, which it
only implements with accelerate (without it from_pretrained raises a ValueError).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ...engine.models.wan import WanSpec, MAX_SEQUENCE_LENGTH, vae_factors, guided
from ...engine.models.base import read_json
from ...engine.protocol import RequestParams
from .base import (
    Family,
    OnStep,
    Tensors,
    cut_prompts,
    load_dit_pipeline,
    concat,
    run_denoise,
    run_denoise_batch,
    set_vae_tiling,
    split,
    uint8_pixels,
)
from ..weights import pretrained


class WanFamily(WanSpec, Family):
    # 1. Encoder
    def load_encoder(self, path, device, dtype):
        from diffusers import WanPipeline

        pipe = pretrained(WanPipeline, path, transformer=None, vae=None, dtype=dtype)
        return pipe.to(device)

    def encode(self, pipe, params: RequestParams) -> Tensors:
        # None: "" when guided, as in the pipeline
        return self._encode(pipe, params.prompt, params.negative_prompt, guided(params))

    def encode_batch(self, pipe, params: list[RequestParams]) -> list[Tensors]:
        # A list must not hold None: encode_prompt maps only a whole missing negative to "".
        negatives = [p.negative_prompt or "" for p in params]
        return split(self._encode(pipe, [p.prompt for p in params], negatives, guided(params[0])), len(params))

    def _encode(self, pipe, prompt, negative, cfg: bool) -> Tensors:
        """prompt, negative: one string (or None) each, or one list entry per request (a batch)."""
        with torch.inference_mode():
            embeds, negative_embeds = pipe.encode_prompt(
                prompt=prompt,
                negative_prompt=negative,
                do_classifier_free_guidance=cfg,
                max_sequence_length=MAX_SEQUENCE_LENGTH,
                device=pipe._execution_device,
            )
        outputs = {"prompt_embeds": embeds}
        if cfg:
            outputs["negative_prompt_embeds"] = negative_embeds
        return outputs

    def prompt_warnings(self, pipe, params: RequestParams) -> list[str]:
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        # UMT5 reads the prompts as the pipeline cleans them (HTML entities, whitespace). Unlike
        # the other pipelines WanPipeline cuts them without a word.
        negative = params.negative_prompt if guided(params) else None
        prompts = {which: prompt_clean(text) if text else None
                   for which, text in {"prompt": params.prompt, "negative prompt": negative}.items()}
        return cut_prompts(prompts, [("UMT5", pipe.tokenizer, MAX_SEQUENCE_LENGTH)])

    # 2. Diffusion transformer
    def load_dit(self, path, device, dtype):
        from diffusers import WanPipeline

        temporal, spatial = vae_factors(read_json(Path(path) / "vae" / "config.json"))
        return load_dit_pipeline(
            WanPipeline, path, device, dtype, drop=("text_encoder", "tokenizer"),
            vae_factors={"vae_scale_factor_temporal": temporal, "vae_scale_factor_spatial": spatial},
        )

    def denoise(self, model, inputs: Tensors, params: RequestParams, on_step: OnStep) -> Tensors:
        return run_denoise(model, inputs, params, on_step, num_frames=params.num_frames,
                           max_sequence_length=MAX_SEQUENCE_LENGTH)

    def denoise_batch(self, model, inputs: list[Tensors], params: list[RequestParams], on_step: list[OnStep]) -> list[Tensors]:
        return run_denoise_batch(model, inputs, params, on_step, num_frames=params[0].num_frames,
                                 max_sequence_length=MAX_SEQUENCE_LENGTH)

    # 3. VAE decoder
    def load_decoder(self, path, device, dtype):
        from diffusers import AutoencoderKLWan
        from diffusers.video_processor import VideoProcessor

        vae = pretrained(AutoencoderKLWan, path, subfolder="vae", dtype=dtype).to(device)
        return vae, VideoProcessor(vae_scale_factor=vae_factors(vae.config)[1])  # as WanPipeline builds it

    def decode(self, model, inputs: Tensors, params: RequestParams) -> Tensors:
        vae, processor = model
        set_vae_tiling(vae, params.vae_tiling)
        config = vae.config
        with torch.inference_mode():
            # WanPipeline.__call__ after its loop, step by step (the same operations in the same
            # order: 1 / std is taken after the cast, as there).
            latents = inputs["latents"].to(vae.device, vae.dtype)
            shape = (1, config.z_dim, 1, 1, 1)
            latents_mean = torch.tensor(config.latents_mean).view(shape).to(latents.device, latents.dtype)
            latents_std = 1.0 / torch.tensor(config.latents_std).view(shape).to(latents.device, latents.dtype)
            latents = latents / latents_std + latents_mean
            video = vae.decode(latents, return_dict=False)[0]
            frames = processor.postprocess_video(video, output_type="np")  # (batch, frames, h, w, 3)
        return {"image": uint8_pixels(frames)}

    def decode_batch(self, model, inputs: list[Tensors], params: list[RequestParams]) -> list[Tensors]:
        # One batch key: one latent shape, no tiling; the decode runs on the stacked latents.
        return split(self.decode(model, concat(inputs), params[0]), len(params))

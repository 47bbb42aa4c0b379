"""Stable Diffusion 3 / 3.5 (StableDiffusion3Pipeline components), split into three stages.

encoder: two CLIP + T5 -> prompt embeddings (negative ones too when guidance_scale > 1, because
         SD3 runs negative and positive as one batch in the DiT).
dit:     SD3Transformer2DModel + FlowMatch scheduler, driven by the pipeline's own __call__ with
         prompt_embeds= and output_type="latent", so the denoising loop is diffusers' exactly.
decoder: AutoencoderKL, unscale/shift, vae.decode, VaeImageProcessor -> uint8 pixels.
"""
from __future__ import annotations

import torch

from ...engine.models.sd3 import SD3Spec, MAX_SEQUENCE_LENGTH
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

_TEXT_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")


class SD3Family(SD3Spec, Family):
    # 1. Encoder
    def load_encoder(self, path, device, dtype):
        from diffusers import StableDiffusion3Pipeline

        pipe = pretrained(StableDiffusion3Pipeline, path, transformer=None, vae=None, dtype=dtype)
        return pipe.to(device)

    def encode(self, pipe, params: RequestParams) -> Tensors:
        return self.encode_batch(pipe, [params])[0]

    def encode_batch(self, pipe, params: list[RequestParams]) -> list[Tensors]:
        # One batch key: all guided or none. A missing negative prompt is "", as in encode_prompt.
        guided = params[0].guidance_scale > 1
        with torch.inference_mode():
            embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
                prompt=[p.prompt for p in params],
                prompt_2=None,
                prompt_3=None,
                negative_prompt=[p.negative_prompt or "" for p in params],
                do_classifier_free_guidance=guided,
                device=pipe._execution_device,
                max_sequence_length=MAX_SEQUENCE_LENGTH,
            )
        outputs = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        if guided:
            outputs |= {"negative_prompt_embeds": negative_embeds, "negative_pooled_prompt_embeds": negative_pooled}
        return split(outputs, len(params))

    def prompt_warnings(self, pipe, params: RequestParams) -> list[str]:
        clip = pipe.tokenizer_max_length
        encoders = [("CLIP", pipe.tokenizer, clip), ("CLIP", pipe.tokenizer_2, clip)]
        if pipe.text_encoder_3 is not None:  # without T5 the pipeline feeds zeros: nothing is cut
            encoders.append(("T5", pipe.tokenizer_3, MAX_SEQUENCE_LENGTH))
        negative = params.negative_prompt if params.guidance_scale > 1 else None
        return cut_prompts({"prompt": params.prompt, "negative prompt": negative}, encoders)

    # 2. Diffusion transformer
    def load_dit(self, path, device, dtype):
        from diffusers import StableDiffusion3Pipeline

        return load_dit_pipeline(StableDiffusion3Pipeline, path, device, dtype, drop=_TEXT_COMPONENTS)

    def denoise(self, model, inputs: Tensors, params: RequestParams, on_step: OnStep) -> Tensors:
        return run_denoise(model, inputs, params, on_step)

    def denoise_batch(self, model, inputs: list[Tensors], params: list[RequestParams], on_step: list[OnStep]) -> list[Tensors]:
        return run_denoise_batch(model, inputs, params, on_step)

    # 3. VAE decoder
    def load_decoder(self, path, device, dtype):
        from diffusers import AutoencoderKL
        from diffusers.image_processor import VaeImageProcessor

        vae = pretrained(AutoencoderKL, path, subfolder="vae", dtype=dtype).to(device)
        processor = VaeImageProcessor(vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1))
        return vae, processor

    def decode(self, model, inputs: Tensors, params: RequestParams) -> Tensors:
        vae, processor = model
        set_vae_tiling(vae, params.vae_tiling)
        latents = inputs["latents"].to(vae.device, vae.dtype)
        with torch.inference_mode():
            latents = (latents / vae.config.scaling_factor) + vae.config.shift_factor
            image = vae.decode(latents, return_dict=False)[0]
            pixels = processor.postprocess(image, output_type="np")
        return {"image": uint8_pixels(pixels)}

    def decode_batch(self, model, inputs: list[Tensors], params: list[RequestParams]) -> list[Tensors]:
        return split(self.decode(model, concat(inputs), params[0]), len(params))

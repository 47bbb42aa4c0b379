"""PixArt-Sigma (PixArtSigmaPipeline components), split into three stages.

encoder: T5 -> prompt embeddings and their attention masks (int64 tensors: the transformer's
         cross-attention must skip the padding of the 300-token sequence); the negative
         prompt's too when guidance_scale > 1, because PixArt runs negative and positive as one
         batch in the DiT.
dit:     PixArtTransformer2DModel + DPM-Solver, driven by the pipeline's own __call__ with
         prompt_embeds=, prompt_attention_mask= and output_type="latent".
decoder: AutoencoderKL (SDXL's): unscale, vae.decode, PixArtImageProcessor -> uint8 pixels.

Two pipeline defaults are fixed here, and references must pass the same:
- clean_caption=False: cleaning needs bs4 and ftfy, and diffusers itself falls back to
  False (lower-case and strip) without them, so the default's result depends on the machine;
- use_resolution_binning=False: the image is rendered at the requested size (binning renders
  at the nearest trained aspect-ratio bucket and resizes; it only exists for sample sizes
  32/64/128/256, so not for small models).
"""
from __future__ import annotations

import torch

from ...engine.models.pixart import PixArtSigmaSpec, MAX_SEQUENCE_LENGTH
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


class PixArtSigmaFamily(PixArtSigmaSpec, Family):
    # 1. Encoder
    def load_encoder(self, path, device, dtype):
        from diffusers import PixArtSigmaPipeline

        pipe = pretrained(PixArtSigmaPipeline, path, transformer=None, vae=None, dtype=dtype)
        return pipe.to(device)

    def encode(self, pipe, params: RequestParams) -> Tensors:
        # The pipeline's default negative prompt is "" (None would not tokenize).
        negative = "" if params.negative_prompt is None else params.negative_prompt
        return self._encode(pipe, params.prompt, negative, params.guidance_scale > 1)

    def encode_batch(self, pipe, params: list[RequestParams]) -> list[Tensors]:
        negatives = ["" if p.negative_prompt is None else p.negative_prompt for p in params]
        outputs = self._encode(pipe, [p.prompt for p in params], negatives, params[0].guidance_scale > 1)
        return split(outputs, len(params))

    def _encode(self, pipe, prompt, negative, guided: bool) -> Tensors:
        """prompt, negative: one string each, or one list entry per request (a batch)."""
        with torch.inference_mode():
            embeds, mask, negative_embeds, negative_mask = pipe.encode_prompt(
                prompt,
                do_classifier_free_guidance=guided,
                negative_prompt=negative,
                device=pipe._execution_device,
                clean_caption=False,
                max_sequence_length=MAX_SEQUENCE_LENGTH,
            )
        outputs = {"prompt_embeds": embeds, "prompt_attention_mask": mask}
        if guided:
            outputs |= {"negative_prompt_embeds": negative_embeds, "negative_prompt_attention_mask": negative_mask}
        return outputs

    def prompt_warnings(self, pipe, params: RequestParams) -> list[str]:
        # T5 reads the prompts as encode_prompt has made them (clean_caption=False: lower-cased, stripped).
        negative = params.negative_prompt if params.guidance_scale > 1 else None
        prompts = {which: pipe._text_preprocessing(text, clean_caption=False)[0] if text else None
                   for which, text in {"prompt": params.prompt, "negative prompt": negative}.items()}
        return cut_prompts(prompts, [("T5", pipe.tokenizer, MAX_SEQUENCE_LENGTH)])

    # 2. Diffusion transformer
    def load_dit(self, path, device, dtype):
        from diffusers import PixArtSigmaPipeline

        return load_dit_pipeline(PixArtSigmaPipeline, path, device, dtype, drop=("text_encoder", "tokenizer"))

    def denoise(self, model, inputs: Tensors, params: RequestParams, on_step: OnStep) -> Tensors:
        return run_denoise(
            model, inputs, params, on_step, legacy_callback=True,
            negative_prompt=None,  # must be None beside negative_prompt_embeds (check_inputs)
            use_resolution_binning=False, clean_caption=False, max_sequence_length=MAX_SEQUENCE_LENGTH,
        )

    def denoise_batch(self, model, inputs: list[Tensors], params: list[RequestParams], on_step: list[OnStep]) -> list[Tensors]:
        return run_denoise_batch(
            model, inputs, params, on_step, legacy_callback=True, negative_prompt=None,
            use_resolution_binning=False, clean_caption=False, max_sequence_length=MAX_SEQUENCE_LENGTH,
        )

    # 3. VAE decoder
    def load_decoder(self, path, device, dtype):
        from diffusers import AutoencoderKL
        from diffusers.image_processor import PixArtImageProcessor

        vae = pretrained(AutoencoderKL, path, subfolder="vae", dtype=dtype).to(device)
        processor = PixArtImageProcessor(vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1))
        return vae, processor

    def decode(self, model, inputs: Tensors, params: RequestParams) -> Tensors:
        vae, processor = model
        set_vae_tiling(vae, params.vae_tiling)
        latents = inputs["latents"].to(vae.device, vae.dtype)
        with torch.inference_mode():
            # PixArtSigmaPipeline.__call__ after its loop: cast first, then unscale (no shift).
            image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
            pixels = processor.postprocess(image, output_type="np")
        return {"image": uint8_pixels(pixels)}

    def decode_batch(self, model, inputs: list[Tensors], params: list[RequestParams]) -> list[Tensors]:
        # One batch key: one latent shape, no tiling; the decode runs on the stacked latents.
        return split(self.decode(model, concat(inputs), params[0]), len(params))

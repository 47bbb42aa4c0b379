"""FLUX.1 (FluxPipeline components), split into three stages.

encoder: CLIP (pooled output only) + T5 -> prompt embeddings; the negative prompt's too when
         true CFG is on (true_cfg_scale > 1 with a negative prompt), because Flux runs it as a
         second transformer pass with its own embeddings, not as a CFG batch.
dit:     FluxTransformer2DModel + FlowMatch scheduler, driven by the pipeline's own __call__
         with prompt_embeds= and output_type="latent": latent packing (2x2 patches), img/txt
         ids, the resolution-dependent shift mu, the guidance embedding and true CFG are all
         diffusers' own. Its output stays packed: (batch, tokens, 64).
decoder: AutoencoderKL: unpack, unscale/shift, vae.decode, VaeImageProcessor -> uint8 pixels,
         exactly as FluxPipeline does after its loop.
"""
from __future__ import annotations

import torch

from ...engine.models.flux import FluxSpec, PACK, MAX_SEQUENCE_LENGTH, true_cfg
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

_TEXT_COMPONENTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


class FluxFamily(FluxSpec, Family):
    # 1. Encoder
    def load_encoder(self, path, device, dtype):
        from diffusers import FluxPipeline

        pipe = pretrained(FluxPipeline, path, transformer=None, vae=None, dtype=dtype)
        return pipe.to(device)

    def encode(self, pipe, params: RequestParams) -> Tensors:
        negative = params.negative_prompt if true_cfg(params) else None
        return self._encode(pipe, params.prompt, negative)

    def encode_batch(self, pipe, params: list[RequestParams]) -> list[Tensors]:
        # One batch key: true CFG on for all (each has a negative prompt) or for none.
        negatives = [p.negative_prompt for p in params] if true_cfg(params[0]) else None
        return split(self._encode(pipe, [p.prompt for p in params], negatives), len(params))

    def _encode(self, pipe, prompt, negative) -> Tensors:
        """prompt, negative: one string each, or one list entry per request (a batch)."""
        prompts = {"": prompt}
        if negative is not None:
            prompts["negative_"] = negative
        outputs = {}
        with torch.inference_mode():
            for prefix, prompt in prompts.items():
                # text_ids (zeros) are not sent: the DiT's own encode_prompt rebuilds them.
                embeds, pooled, _text_ids = pipe.encode_prompt(
                    prompt=prompt, prompt_2=None, device=pipe._execution_device,
                    max_sequence_length=MAX_SEQUENCE_LENGTH,
                )
                outputs |= {f"{prefix}prompt_embeds": embeds, f"{prefix}pooled_prompt_embeds": pooled}
        return outputs

    def prompt_warnings(self, pipe, params: RequestParams) -> list[str]:
        encoders = [("CLIP", pipe.tokenizer, pipe.tokenizer_max_length), ("T5", pipe.tokenizer_2, MAX_SEQUENCE_LENGTH)]
        negative = params.negative_prompt if true_cfg(params) else None
        return cut_prompts({"prompt": params.prompt, "negative prompt": negative}, encoders)

    # 2. Diffusion transformer
    def load_dit(self, path, device, dtype):
        from diffusers import FluxPipeline

        return load_dit_pipeline(FluxPipeline, path, device, dtype, drop=_TEXT_COMPONENTS)

    def denoise(self, model, inputs: Tensors, params: RequestParams, on_step: OnStep) -> Tensors:
        # negative_* inputs are present only with true CFG: the pipeline's own rule then holds.
        return run_denoise(model, inputs, params, on_step, true_cfg_scale=params.true_cfg_scale,
                           max_sequence_length=MAX_SEQUENCE_LENGTH)

    def denoise_batch(self, model, inputs: list[Tensors], params: list[RequestParams], on_step: list[OnStep]) -> list[Tensors]:
        return run_denoise_batch(model, inputs, params, on_step, true_cfg_scale=params[0].true_cfg_scale,
                                 max_sequence_length=MAX_SEQUENCE_LENGTH)

    # 3. VAE decoder
    def load_decoder(self, path, device, dtype):
        from diffusers import AutoencoderKL
        from diffusers.image_processor import VaeImageProcessor

        vae = pretrained(AutoencoderKL, path, subfolder="vae", dtype=dtype).to(device)
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        return vae, VaeImageProcessor(vae_scale_factor=factor * PACK), factor  # as FluxPipeline builds it

    def decode(self, model, inputs: Tensors, params: RequestParams) -> Tensors:
        from diffusers import FluxPipeline

        vae, processor, factor = model
        set_vae_tiling(vae, params.vae_tiling)
        with torch.inference_mode():
            # FluxPipeline.__call__ after its loop, step by step.
            latents = FluxPipeline._unpack_latents(inputs["latents"], params.height, params.width, factor)
            latents = (latents / vae.config.scaling_factor) + vae.config.shift_factor
            latents = latents.to(vae.device, vae.dtype)
            image = vae.decode(latents, return_dict=False)[0]
            pixels = processor.postprocess(image, output_type="np")
        return {"image": uint8_pixels(pixels)}

    def decode_batch(self, model, inputs: list[Tensors], params: list[RequestParams]) -> list[Tensors]:
        # One batch key: one latent shape, no tiling; the decode runs on the stacked latents.
        return split(self.decode(model, concat(inputs), params[0]), len(params))

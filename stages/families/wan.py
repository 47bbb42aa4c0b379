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

import math
from pathlib import Path

import torch

from ...engine.protocol import RequestParams
from .base import (
    Family,
    ModelInfo,
    OnStep,
    Tensors,
    image_peak_bytes,
    load_dit_pipeline,
    read_json,
    concat,
    run_denoise,
    run_denoise_batch,
    set_vae_tiling,
    slot_nbytes,
    split,
    uint8_pixels,
)
from ..weights import pretrained

MAX_SEQUENCE_LENGTH = 512  # WanPipeline.__call__'s default (encode_prompt's own default is 226)
# WanPipeline.__call__'s defaults: 480 x 832, 81 frames (5 s at Wan's 16 fps), 50 steps, CFG 5.
DEFAULT_HEIGHT, DEFAULT_WIDTH, DEFAULT_FRAMES = 480, 832, 81
# RoPE tables cover rope_max_seq_len positions per axis (16384 px, 4093 frames for Wan2.1):
# these are sanity caps beside them, as Flux's; memory admission and slot sizes do the rest.
MAX_SIZE = 4096
MAX_FRAMES = 1025
SIZE_MULTIPLE = 16  # WanPipeline.check_inputs: height and width must be multiples of 16 whatever the patch
VAE_TILE = 256  # AutoencoderKLWan.tile_sample_min_height/width (not in its config)
CACHE_FRAMES = 2  # the causal convolutions keep their last 2 input frames between chunks


def vae_factors(vae: dict) -> tuple[int, int]:
    """(temporal, spatial) scale factors of an AutoencoderKLWan config (older configs omit
    them: diffusers' defaults then apply)."""
    return vae.get("scale_factor_temporal") or 4, vae.get("scale_factor_spatial") or 8


def latent_frames(info: ModelInfo, num_frames: int) -> int:
    return (num_frames - 1) // info.frame_step + 1


def guided(params: RequestParams) -> bool:
    return params.guidance_scale > 1  # WanPipeline.do_classifier_free_guidance


class WanFamily(Family):
    name = "wan"
    pipeline_class = "WanPipeline"

    def describe(self, path: Path) -> ModelInfo:
        transformer = read_json(path / "transformer" / "config.json")
        vae = read_json(path / "vae" / "config.json")
        temporal, spatial = vae_factors(vae)
        patch_t, patch_h, patch_w = transformer.get("patch_size", (1, 2, 2))
        rope = transformer.get("rope_max_seq_len", 1024)
        multiple = math.lcm(SIZE_MULTIPLE, spatial * patch_h, spatial * patch_w)
        max_size = min(MAX_SIZE, rope * spatial * min(patch_h, patch_w)) // multiple * multiple
        max_frames = min(MAX_FRAMES, (rope // patch_t - 1) * temporal + 1)
        return ModelInfo(
            path=path,
            family=self.name,
            pixel_multiple=multiple,
            default_size=DEFAULT_HEIGHT,
            max_size=max_size,
            num_inference_steps=50,
            guidance_scale=5.0,
            dims={
                "dit_width": transformer["num_attention_heads"] * transformer["attention_head_dim"],
                "text_tokens": MAX_SEQUENCE_LENGTH,
                "text_width": transformer["text_dim"],  # the UMT5 width the transformer reads
                "latent_channels": transformer["in_channels"],
                "patch": patch_h,
                "vae_factor": spatial,
                "vae_channels": vae.get("decoder_base_dim") or vae["base_dim"],  # full-resolution maps
                "vae_tile": VAE_TILE,
            },
            video=True,
            default_shape=(DEFAULT_HEIGHT, DEFAULT_WIDTH),
            default_frames=DEFAULT_FRAMES,
            frame_step=temporal,
            max_frames=(max_frames - 1) // temporal * temporal + 1,
        )

    def peak_bytes(self, info: ModelInfo, stage: str, params: RequestParams, itemsize: int) -> int:
        # Cross-attention only (text is not in the sequence); cond and uncond run one after the
        # other; the VAE holds one latent frame's output frames plus its convolution caches.
        return image_peak_bytes(
            info, stage, params, itemsize, text_batch=2 if guided(params) else 1, dit_batch=1, joint_text=False,
            latent_frames=latent_frames(info, params.num_frames), vae_frames=info.frame_step + CACHE_FRAMES,
        )

    def output_bytes(self, info: ModelInfo, stage: str, params: RequestParams, itemsize: int) -> int:
        d = info.dims
        if stage == "encoder":
            embeds = d["text_tokens"] * d["text_width"] * itemsize
            return slot_nbytes(*[embeds] * (2 if guided(params) else 1))
        if stage == "dit":  # the pipeline keeps its latents in float32 whatever the model's dtype
            h, w = params.height // d["vae_factor"], params.width // d["vae_factor"]
            return slot_nbytes(d["latent_channels"] * latent_frames(info, params.num_frames) * h * w * 4)
        return super().output_bytes(info, stage, params, itemsize)

    def supports_vae_tiling(self) -> bool:
        return True

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

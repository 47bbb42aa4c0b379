"""Wan2.1 text-to-video: what the engine knows of the model folder without loading it (stages/families/wan.py runs it)."""

from __future__ import annotations

import math
from pathlib import Path

from ..protocol import RequestParams
from .base import FamilySpec, ModelInfo, slot_nbytes, image_peak_bytes, read_json

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


class WanSpec(FamilySpec):
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

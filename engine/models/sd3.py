"""Stable Diffusion 3 / 3.5: what the engine knows of the model folder without loading it (stages/families/sd3.py runs it)."""

from __future__ import annotations

from pathlib import Path

from ..protocol import RequestParams
from .base import FamilySpec, ModelInfo, image_peak_bytes, read_json

MAX_SEQUENCE_LENGTH = 256  # StableDiffusion3Pipeline's default T5 length


class SD3Spec(FamilySpec):
    name = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"

    def describe(self, path: Path) -> ModelInfo:
        transformer = read_json(path / "transformer" / "config.json")
        vae = read_json(path / "vae" / "config.json")
        vae_factor = 2 ** (len(vae["block_out_channels"]) - 1)
        patch = transformer["patch_size"]
        max_patches = transformer.get("pos_embed_max_size") or transformer["sample_size"] // patch
        return ModelInfo(
            path=path,
            family=self.name,
            pixel_multiple=vae_factor * patch,
            default_size=transformer["sample_size"] * vae_factor,
            max_size=max_patches * patch * vae_factor,
            num_inference_steps=28,
            guidance_scale=7.0,
            dims={
                "dit_width": transformer["num_attention_heads"] * transformer["attention_head_dim"],
                "text_tokens": 77 + MAX_SEQUENCE_LENGTH,  # CLIP tokens + T5 tokens, concatenated
                "text_width": transformer["joint_attention_dim"],
                "vae_channels": vae["block_out_channels"][0],  # channels of the full-resolution maps
                "vae_tile": vae.get("sample_size", 1024),  # AutoencoderKL's tile_sample_min_size
                "vae_factor": vae_factor,
                "patch": patch,
            },
        )

    def peak_bytes(self, info: ModelInfo, stage: str, params: RequestParams, itemsize: int) -> int:
        batch = 2 if params.guidance_scale > 1 else 1  # negative + positive as one batch
        return image_peak_bytes(info, stage, params, itemsize, text_batch=batch, dit_batch=batch, joint_text=True)

    def supports_vae_tiling(self) -> bool:
        return True

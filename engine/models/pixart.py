"""PixArt-Sigma: what the engine knows of the model folder without loading it (stages/families/pixart.py runs it)."""

from __future__ import annotations

from pathlib import Path

from ..protocol import RequestParams
from .base import FamilySpec, ModelInfo, image_peak_bytes, read_json, vae_dims

MAX_SEQUENCE_LENGTH = 300  # PixArtSigmaPipeline's default T5 length
# The sin-cos position embedding is recomputed for any other size, so no table bounds the
# image; 4096 px is PixArt-Sigma's largest trained size (its "4K" model).
MAX_SIZE = 4096


class PixArtSigmaSpec(FamilySpec):
    name = "pixart"
    pipeline_class = "PixArtSigmaPipeline"

    def describe(self, path: Path) -> ModelInfo:
        transformer = read_json(path / "transformer" / "config.json")
        vae = vae_dims(read_json(path / "vae" / "config.json"))
        patch = transformer["patch_size"]
        return ModelInfo(
            path=path,
            family=self.name,
            pixel_multiple=vae["vae_factor"] * patch,
            default_size=transformer["sample_size"] * vae["vae_factor"],
            max_size=MAX_SIZE,
            num_inference_steps=20,
            guidance_scale=4.5,
            dims={
                "dit_width": transformer["num_attention_heads"] * transformer["attention_head_dim"],
                "text_tokens": MAX_SEQUENCE_LENGTH,
                "text_width": transformer["caption_channels"],
                "patch": patch,
                **vae,
            },
        )

    def peak_bytes(self, info: ModelInfo, stage: str, params: RequestParams, itemsize: int) -> int:
        batch = 2 if params.guidance_scale > 1 else 1
        # Text enters through cross-attention only: the transformer's sequence is image tokens.
        return image_peak_bytes(info, stage, params, itemsize, text_batch=batch, dit_batch=batch, joint_text=False)

    def supports_vae_tiling(self) -> bool:
        return True

"""FLUX.1: what the engine knows of the model folder without loading it (stages/families/flux.py runs it)."""

from __future__ import annotations

from pathlib import Path

from ..protocol import RequestParams
from .base import FamilySpec, ModelInfo, image_peak_bytes, read_json, vae_dims

PACK = 2  # the pipeline packs 2x2 latent pixels into one token
DEFAULT_SAMPLE_SIZE = 128  # FluxPipeline.default_sample_size (latent pixels): 1024 px images
MAX_SEQUENCE_LENGTH = 512  # FluxPipeline's default T5 length (FLUX.1-schnell users often pass 256)
# RoPE positions are computed for any size, so no table bounds the image; 4096 px (a 4x larger
# side than FLUX.1 was trained at) is a sanity cap, and memory admission does the rest.
MAX_SIZE = 4096


def true_cfg(params: RequestParams) -> bool:
    """diffusers' rule (FluxPipeline.__call__): a second pass with the negative prompt's
    embeddings when true_cfg_scale > 1 and a negative prompt (even "") is given."""
    return params.true_cfg_scale > 1 and params.negative_prompt is not None


class FluxSpec(FamilySpec):
    name = "flux"
    pipeline_class = "FluxPipeline"

    def describe(self, path: Path) -> ModelInfo:
        transformer = read_json(path / "transformer" / "config.json")
        vae = vae_dims(read_json(path / "vae" / "config.json"))
        return ModelInfo(
            path=path,
            family=self.name,
            pixel_multiple=vae["vae_factor"] * PACK,
            default_size=DEFAULT_SAMPLE_SIZE * vae["vae_factor"],
            max_size=MAX_SIZE,
            num_inference_steps=28,
            # Embedded guidance (FLUX.1-dev); a model without guidance_embeds ignores it.
            guidance_scale=3.5,
            dims={
                "dit_width": transformer["num_attention_heads"] * transformer["attention_head_dim"],
                "text_tokens": MAX_SEQUENCE_LENGTH,  # T5 tokens join the image tokens (MMDiT)
                "text_width": transformer["joint_attention_dim"],
                "patch": PACK * transformer.get("patch_size", 1),
                **vae,
            },
            true_cfg=True,
        )

    def peak_bytes(self, info: ModelInfo, stage: str, params: RequestParams, itemsize: int) -> int:
        # True CFG encodes two prompts, but its two transformer passes run one after the other.
        return image_peak_bytes(info, stage, params, itemsize, text_batch=2 if true_cfg(params) else 1,
                                dit_batch=1, joint_text=True)

    def supports_vae_tiling(self) -> bool:
        return True

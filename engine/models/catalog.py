"""What models there are and what one needs, without loading it: `dfuse models list` (the
built-in tiny models and the diffusers folders in the Hugging Face cache) and `dfuse models
inspect` (family, components, weights per stage, defaults, slot and activation memory)."""

from __future__ import annotations

import json
from pathlib import Path

from ...scheduler.core import STAGES
from ..protocol import RequestParams
from . import variant_of, weight_stem, describe_model, detect_family, resolve_model_path
from .hub import hub_cache
from .tiny import TINY_MODELS, cache_dir, cache_problem

# Subfolders holding each stage's weights (diffusers layout).
STAGE_COMPONENTS = {
    "encoder": ("text_encoder", "text_encoder_2", "text_encoder_3"),
    "dit": ("transformer",),
    "decoder": ("vae",),
}
WEIGHT_FILES = ("*.safetensors", "*.bin")  # in the order from_pretrained prefers them


def stage_weight_bytes(path: Path, stage: str, variant: str | None = None) -> int:
    """Bytes of the weight files `stage` loads from the model folder at `path`: per component,
    one format (safetensors if there are any) of one variant, as from_pretrained picks them (a
    snapshot `hf download` made may hold several)."""
    total = 0
    for component in STAGE_COMPONENTS[stage]:
        for pattern in WEIGHT_FILES:
            files = [f for f in (path / component).glob(pattern) if variant_of(weight_stem(f.name)) == variant]
            if files:
                total += sum(f.stat().st_size for f in files)
                break
    return total


def list_models() -> list[dict]:
    """The built-in tiny models (built or not yet) and every snapshot in the hub cache with a
    model_index.json, each with its family (or why dfuse cannot serve it)."""
    found = []
    for name in sorted(TINY_MODELS):
        built = sorted((cache_dir() / "models").glob(f"{name}-v*"))
        where = str(built[-1]) if built else "built on first use"
        if built and (problem := cache_problem(built[-1])):
            where += f" (not used: {problem[0]} {problem[1]})"
        found.append({"model": name, "family": name.removeprefix("tiny-"), "where": where})
    for snapshot in sorted(hub_cache().glob("models--*/snapshots/*")):
        if not (snapshot / "model_index.json").is_file():
            continue
        repo = snapshot.parent.parent.name.removeprefix("models--").replace("--", "/")
        try:
            family = detect_family(snapshot).name
        except ValueError as e:
            family = f"not served ({str(e).partition('; ')[0].removeprefix('model: ')})"
        found.append({"model": repo, "family": family, "where": str(snapshot)})
    return found


def inspect_model(model: str) -> dict:
    """What `model` is and needs at its defaults; ValueError naming `model` if it cannot be served."""
    path = resolve_model_path(model)
    family, info = detect_family(path), describe_model(path)
    height, width = info.default_height_width
    params = RequestParams("", None, info.num_inference_steps, info.guidance_scale, height, width, 0,
                           num_frames=info.default_frames)
    doc = {"model": model, "path": str(path), "family": info.family, "pipeline": family.pipeline_class,
           "defaults": {"height": height, "width": width, "num_inference_steps": info.num_inference_steps,
                        "guidance_scale": info.guidance_scale, "num_frames": info.default_frames},
           "components": {}, "stages": {}}
    if isinstance(path, Path):
        index = json.loads((path / "model_index.json").read_text())
        doc["components"] = {name: value[1] for name, value in index.items()
                             if isinstance(value, list) and len(value) == 2 and value[1]}
    for stage in STAGES:
        doc["stages"][stage] = {
            "weights_gb": round(stage_weight_bytes(path, stage) / 1e9, 6) if isinstance(path, Path) else 0.0,
            # None where the family does not estimate it (the worker still refuses an overflow)
            "slot_mib_needed": round(family.output_bytes(info, stage, params, 4) / 2**20, 2) or None,
            "activations_gb": {dtype: round(family.peak_bytes(info, stage, params, size) / 1e9, 6)
                               for dtype, size in (("float32", 4), ("bfloat16", 2))},
        }
    return doc

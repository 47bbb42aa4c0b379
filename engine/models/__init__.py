"""What the engine knows of a model without loading it: which family serves a folder, its
static facts (ModelInfo), and where a model name points (built-in tiny models, local folders,
synthetic specs). Stage workers import this too; it imports nothing of theirs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .base import FamilySpec, ModelInfo, read_json
from .hub import download, looks_like_repo_id
from .flux import FluxSpec
from .pixart import PixArtSigmaSpec
from .sd3 import SD3Spec
from .synthetic import PREFIX as SYNTHETIC_PREFIX
from .synthetic import SyntheticSpec, parse_spec
from .tiny import TINY_MODELS, tiny_model_path
from .wan import WanSpec

SPECS: dict[str, FamilySpec] = {
    spec.pipeline_class: spec for spec in (SD3Spec(), FluxSpec(), PixArtSigmaSpec(), WanSpec())
}


def detect_family(path: str | Path) -> FamilySpec:
    """The family serving the diffusers folder at `path` (or a `synthetic:` spec); ValueError
    naming `model` otherwise."""
    if str(path).startswith(SYNTHETIC_PREFIX):
        return SyntheticSpec(str(path))
    path = Path(path)
    supported = ", ".join(sorted(SPECS))
    index = path / "model_index.json"
    if not path.is_dir():
        raise ValueError(f"model: {str(path)!r} is not a directory (expected a diffusers model folder)")
    try:
        class_name = read_json(index)["_class_name"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(
            f"model: {str(path)!r} is not a diffusers pipeline folder (no readable model_index.json "
            f"with a _class_name); supported pipelines: {supported}"
        ) from None
    if not isinstance(class_name, str) or class_name not in SPECS:
        raise ValueError(f"model: pipeline {class_name!r} is not supported; supported pipelines: {supported}")
    return SPECS[class_name]


def describe_model(path: str | Path) -> ModelInfo:
    """Detect the family and read the model's static facts; ValueError naming `model` if unusable."""
    family = detect_family(path)
    if isinstance(family, SyntheticSpec):
        return family.describe(path)
    path = Path(path).resolve()
    try:
        info = family.describe(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"model: {str(path)!r} is not a complete {family.pipeline_class} folder ({e})") from None
    return _with_serving_defaults(info, path / SERVING_DEFAULTS)


# Optional, beside model_index.json: what a request that leaves a field unset gets, where the
# pipeline class's own default does not suit this model (like vLLM's generation_config.json).
# The built-in tiny models use it: diffusers' Flux and Wan defaults (1024 px; 81 frames of
# 832x480) cost minutes on a CPU for a tiny random model. Explicit parameters never change.
SERVING_DEFAULTS = "dfuse.json"
_DEFAULT_FIELDS = ("height", "width", "num_frames", "num_inference_steps")


def _with_serving_defaults(info: ModelInfo, file: Path) -> ModelInfo:
    if not file.exists():
        return info
    where = f"model: {str(file)!r}"
    try:
        defaults = read_json(file)["defaults"]
        if not isinstance(defaults, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(f'{where} must hold {{"defaults": {{...}}}} with any of {", ".join(_DEFAULT_FIELDS)}') from None
    unknown = sorted(set(defaults) - set(_DEFAULT_FIELDS))
    if unknown:
        raise ValueError(f"{where}: unknown default(s) {unknown}; allowed: {', '.join(_DEFAULT_FIELDS)}")
    from ..requests import MAX_STEPS  # the range a request's own value must be in, too

    for name, value in defaults.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{where}: defaults.{name} must be a positive integer (got {value!r})")
    if defaults.get("num_inference_steps", 1) > MAX_STEPS:
        raise ValueError(f"{where}: defaults.num_inference_steps must be in [1, {MAX_STEPS}] "
                         f"(got {defaults['num_inference_steps']})")
    height, width = (defaults.get(k, d) for k, d in zip(("height", "width"), info.default_height_width))
    for name, value in (("height", height), ("width", width)):
        if value % info.pixel_multiple or value > info.max_size:
            raise ValueError(f"{where}: defaults.{name} must be a multiple of {info.pixel_multiple} in "
                             f"[{info.pixel_multiple}, {info.max_size}] (got {value})")
    frames = defaults.get("num_frames", info.default_frames)
    if (frames - 1) % info.frame_step or frames > info.max_frames:
        raise ValueError(f"{where}: defaults.num_frames must be {info.frame_step}k+1 in [1, {info.max_frames}] (got {frames})")
    return dataclasses.replace(
        info, default_size=height if height == width else info.default_size,
        default_shape=None if height == width else (height, width), default_frames=frames,
        num_inference_steps=defaults.get("num_inference_steps", info.num_inference_steps),
    )


def resolve_model_path(model: str, revision: str | None = None, variant: str | None = None) -> Path | str:
    """The folder of `model`: a built-in tiny model (built on first use), a local folder, or a
    Hugging Face repo id (engine/models/hub.py: the snapshot in the HF cache, downloaded where it
    is missing); a `synthetic:` spec (benchmarks of the engine itself) is returned as it is, once
    parsed. ValueError naming `model` where none of these is usable."""
    if model.startswith(SYNTHETIC_PREFIX):
        parse_spec(model)
        return model
    path = tiny_model_path(model) if model in TINY_MODELS else Path(model).expanduser()
    if not path.exists():
        if not looks_like_repo_id(model):
            raise ValueError(
                f"model: {model!r} is neither a built-in model ({', '.join(sorted(TINY_MODELS))}), an existing "
                "folder, nor a Hugging Face repo id (owner/name)"
            )
        path = download(model, revision, variant)
    if model not in TINY_MODELS:  # a built-in one is returned as its cache names it
        path = path.resolve()
    if (path / "model_index.json").is_file():
        check_weight_files(path, variant)
    return path


# The folders of a diffusers pipeline that hold weights (the others: tokenizers, schedulers).
WEIGHT_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae")


def check_weight_files(path: Path, variant: str | None = None) -> None:
    """ValueError naming the component and the file it lacks, before any worker tries to load it
    (diffusers itself names the .bin it fell back to when the .safetensors is missing)."""
    try:
        index = read_json(path / "model_index.json")
    except (OSError, ValueError):
        return  # detect_family says what is wrong with it
    found = {}  # component -> {file name: its stem}
    for name in WEIGHT_COMPONENTS:
        entry = index.get(name)
        if isinstance(entry, list) and len(entry) == 2 and entry[1]:  # else not part of this pipeline
            found[name] = {f.name: stem for f in (path / name).glob("*") if (stem := weight_stem(f.name))}
    for name, stems in found.items():  # each stage loads its own components, each of them with `variant`
        if any(variant_of(stem) == variant for stem in stems.values()):
            continue
        folder, entry = path / name, index[name]
        stem = "diffusion_pytorch_model" if entry[0] == "diffusers" else "model"
        suffix = f".{variant}" if variant else ""
        has = f" (it has {', '.join(sorted(stems))})" if stems else ""
        others = sorted({v for v in map(variant_of, stems.values()) if v})
        hint = f"; --variant {others[0]} loads the files it has" if others and not variant else ""
        raise ValueError(f"model: {str(folder)!r} holds no {variant + ' ' if variant else ''}weights{has}: expected "
                         f"{stem}{suffix}.safetensors (or shards listed in {stem}{suffix}.safetensors.index.json){hint}")


_WEIGHT_SUFFIXES = (".safetensors.index.json", ".bin.index.json", ".safetensors", ".bin")


def weight_stem(filename: str) -> str | None:
    """'model.fp16' of 'model.fp16.safetensors'; None for a file that holds no weights."""
    for suffix in _WEIGHT_SUFFIXES:
        if filename.endswith(suffix):
            return filename.removesuffix(suffix)
    return None


def variant_of(stem: str) -> str | None:
    """diffusers' variant in a weight file's stem: model.fp16, model.fp16-00001-of-00002 -> fp16;
    model, model-00001-of-00002 -> None."""
    if "." not in stem:
        return None
    return stem.rsplit(".", 1)[1].split("-", 1)[0]

"""Validation of generation requests: every bad field gets a ValueError naming it and its range."""

from __future__ import annotations

import math
import numbers
import secrets
from collections.abc import Sequence

from .models.base import ModelInfo
from .protocol import RequestParams

MAX_PROMPTS = 256
MAX_STEPS = 1000
MAX_GUIDANCE = 100.0
MAX_SEED = 2**63 - 1
MAX_PROMPT_CHARS = 10_000


def build_requests(
    info: ModelInfo,
    prompt,
    negative_prompt=None,
    num_inference_steps=None,
    guidance_scale=None,
    height=None,
    width=None,
    seed=None,
    true_cfg_scale=None,
    num_frames=None,
) -> list[RequestParams]:
    """One RequestParams per prompt; prompt i uses seed + i so each image is reproducible alone.

    true_cfg_scale (Flux only, default 1): true classifier-free guidance, a second transformer
    pass with the negative prompt, when it is > 1 and a negative prompt is given (as diffusers'
    FluxPipeline); guidance_scale is then still the embedded guidance.
    num_frames (video families only): frame_step * k + 1 frames, the model's default if None;
    image families accept only None or 1."""
    prompts = _prompts("prompt", prompt, allow_none=False)
    negatives = _prompts("negative_prompt", negative_prompt, allow_none=True)
    if not isinstance(negative_prompt, (str, type(None))) and len(negatives) != len(prompts):
        raise ValueError(
            f"negative_prompt: a list must have one entry per prompt ({len(prompts)}), got {len(negatives)}"
        )
    if len(negatives) == 1:
        negatives = negatives * len(prompts)
    steps = _integer("num_inference_steps", info.num_inference_steps if num_inference_steps is None else num_inference_steps, 1, MAX_STEPS)
    guidance = _scale("guidance_scale", info.guidance_scale if guidance_scale is None else guidance_scale)
    true_cfg = _scale("true_cfg_scale", 1.0 if true_cfg_scale is None else true_cfg_scale)
    if true_cfg > 1 and not info.true_cfg:
        raise ValueError(
            f"true_cfg_scale: the {info.family} family has no true CFG (Flux models do); "
            f"use guidance_scale, or leave true_cfg_scale at 1 (got {true_cfg:g})"
        )
    default_height, default_width = info.default_height_width
    height = _size("height", default_height if height is None else height, info)
    width = _size("width", default_width if width is None else width, info)
    frames = _frames(num_frames, info)
    if seed is None:
        seed = secrets.randbelow(MAX_SEED - MAX_PROMPTS)
    seed = _integer("seed", seed, 0, MAX_SEED - len(prompts) + 1)
    return [
        RequestParams(p, n, steps, guidance, height, width, seed + i, true_cfg_scale=true_cfg, num_frames=frames)
        for i, (p, n) in enumerate(zip(prompts, negatives))
    ]


MAX_PRIORITY = 1000
MAX_TIMEOUT_S = 86_400.0


def check_priority(value) -> int:
    return _integer("priority", value, -MAX_PRIORITY, MAX_PRIORITY)


def check_timeout(value) -> float | None:
    """Seconds a request may take in all; None waits for as long as it takes."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not _finite(value) or not 0 < value <= MAX_TIMEOUT_S:
        raise ValueError(f"timeout: must be None or a number of seconds in (0, {MAX_TIMEOUT_S:g}] (got {value!r})")
    return float(value)


def _prompts(field: str, value, allow_none: bool) -> list:
    if value is None and allow_none:
        return [None]
    if isinstance(value, str):
        values = [value]
    elif isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        values = list(value)
        if not 1 <= len(values) <= MAX_PROMPTS:
            raise ValueError(f"{field}: a list must hold 1 to {MAX_PROMPTS} strings (got {len(values)})")
    else:
        kind = "a string, a list of strings or None" if allow_none else "a string or a list of strings"
        raise ValueError(f"{field}: must be {kind} (got {type(value).__name__})")
    for i, item in enumerate(values):
        if not isinstance(item, str):
            raise ValueError(f"{field}[{i}]: must be a string (got {type(item).__name__})")
        if len(item) > MAX_PROMPT_CHARS:
            raise ValueError(f"{field}[{i}]: at most {MAX_PROMPT_CHARS} characters (got {len(item)})")
        try:
            item.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"{field}[{i}]: must be valid Unicode text ({e.reason} at position {e.start})") from None
    return values


def _integer(field: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{field}: must be an integer in [{low}, {high}] (got {value!r})")
    if not low <= value <= high:
        raise ValueError(f"{field}: must be in [{low}, {high}] (got {value})")
    return int(value)


def _scale(field: str, value) -> float:
    """A guidance scale: values <= 1 turn that guidance off, as in diffusers."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not _finite(value):
        raise ValueError(f"{field}: must be a finite number in [0, {MAX_GUIDANCE:g}] (got {value!r})")
    if not 0 <= value <= MAX_GUIDANCE:
        raise ValueError(f"{field}: must be in [0, {MAX_GUIDANCE:g}] (got {value})")
    return float(value)


def _finite(value: numbers.Real) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _size(field: str, value, info: ModelInfo) -> int:
    m = info.pixel_multiple
    allowed = f"a multiple of {m} in [{m}, {info.max_size}]"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{field}: must be {allowed} (got {value!r})")
    if value <= 0 or value % m or value > info.max_size:
        raise ValueError(f"{field}: must be {allowed} (got {value})")
    return int(value)


def _frames(value, info: ModelInfo) -> int:
    """Video: frame_step * k + 1 frames (the VAE compresses frame_step frames after the first
    into one latent frame; diffusers would silently round other counts). Images: one frame."""
    if not info.video:
        if value is None or (_is_integer(value) and value == 1):
            return 1
        raise ValueError(f"num_frames: the {info.family} family makes images, not videos; leave num_frames "
                         f"unset or 1 (got {value!r})")
    step = info.frame_step
    allowed = (f"{step}k+1 in [1, {info.max_frames}], e.g. 1, {1 + step}, {1 + 2 * step}, ... "
               f"(default {info.default_frames})")
    value = info.default_frames if value is None else value
    if not _is_integer(value):
        raise ValueError(f"num_frames: must be an integer {allowed} (got {value!r})")
    if not 1 <= value <= info.max_frames or (value - 1) % step:
        raise ValueError(f"num_frames: must be {allowed} (got {value})")
    return int(value)


def _is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)

"""POST /v1/images/generations: OpenAI's request body, plus dfuse's extras as top-level fields
(what the `openai` client sends with `extra_body=`), and the encoding of the images.

The n images of one request are the prompt n times with seeds seed, seed+1, ... seed+n-1: each
equals `Engine.generate(prompt, seed=seed+k)`. The engine checks every generation field (one
validation path for all fronts); this module checks only what is the server's own."""

from __future__ import annotations

import io
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import APIError

FORMATS = {"png": ("PNG", "image/png"), "jpeg": ("JPEG", "image/jpeg"), "webp": ("WEBP", "image/webp")}
_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


class ImageRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str
    model: str | None = None
    n: int = Field(1, ge=1, le=10)
    size: str | None = None  # "WxH" or "auto": the model's default
    response_format: Literal["b64_json", "url"] | None = None
    output_format: Literal["png", "jpeg", "webp"] | None = None
    output_compression: int | None = Field(None, ge=0, le=100)
    user: str | None = None
    # OpenAI fields with no meaning for a diffusion model: only their "let the server decide" values.
    quality: Literal["auto"] | None = None
    style: None = None
    background: Literal["auto", "opaque"] | None = None
    moderation: Literal["auto"] | None = None
    # dfuse's extras: checked by the engine (the same errors as Engine.submit)
    seed: Any = None
    num_inference_steps: Any = None
    guidance_scale: Any = None
    true_cfg_scale: Any = None
    negative_prompt: Any = None
    priority: Any = 0
    timeout: Any = None


def parse(body: Any, model_name: str) -> ImageRequest:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        request = ImageRequest.model_validate(body, strict=False)
    except ValidationError as e:
        raise first_error(e) from None
    if request.model is not None and request.model != model_name:
        raise APIError(404, f"model: this server serves {model_name!r}, not {request.model!r}", param="model",
                       code="model_not_found")
    if request.output_compression is not None and (request.output_format or "png") == "png":
        raise APIError(400, "output_compression: applies to output_format jpeg or webp, not png",
                       param="output_compression", code="invalid_value")
    return request


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """(height, width) from "WxH"; (None, None) for "auto" or no size: the model's default."""
    if size is None or size == "auto":
        return None, None
    match = _SIZE.match(size)
    if not match:
        raise APIError(400, f"size: must be 'WIDTHxHEIGHT' in pixels, e.g. '1024x1024', or 'auto' (got {size!r})",
                       param="size", code="invalid_value")
    width, height = int(match[1]), int(match[2])
    return height, width


def size_error(message: str) -> APIError | None:
    """The engine's height/width errors, said about the field the client sent (size)."""
    field, _, rest = message.partition(": ")
    if field in ("height", "width", "height/width"):
        return APIError(400, f"size: the {field} {rest}", param="size", code="invalid_value")
    return None


def encode(image, output_format: str, compression: int | None) -> bytes:
    """PNG (lossless: pixel for pixel what the engine made), JPEG or WEBP at quality
    `compression` (0-100, default 90)."""
    name, _ = FORMATS[output_format]
    buffer = io.BytesIO()
    if output_format == "png":
        image.save(buffer, name)
    else:
        image.save(buffer, name, quality=90 if compression is None else compression)
    return buffer.getvalue()


def first_error(error: ValidationError) -> APIError:
    first = error.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    if first["type"] == "extra_forbidden":
        message = f"{param}: unknown field (see POST /v1/images/generations in the README for the fields)"
    elif first["type"] == "missing":
        message = f"{param}: required"
    else:
        message = f"{param}: {first['msg']} (got {repr(first.get('input'))[:80]})"
    return APIError(400, message, param=param, code="invalid_value")

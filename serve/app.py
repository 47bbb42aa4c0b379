"""The routes. Generation goes through `Engine.submit` (no second code path); the server adds
only HTTP: OpenAI's shapes, auth, admission (--max-queue), encoding and serving outputs."""

from __future__ import annotations

import base64
import hmac
import importlib.resources
import time

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response

from . import errors, images, videos
from .errors import APIError
from .metrics import CONTENT_TYPE
from .state import ClientGone, ServerState, read_json


def create_app(state: ServerState, lifespan=None) -> FastAPI:
    app = FastAPI(title="dfuse", summary="Disaggregated diffusion serving, OpenAI-compatible",
                  docs_url="/docs", redoc_url=None, lifespan=lifespan)
    app.state.dfuse = state
    errors.install(app)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_api_key_checker(state))])
    _image_routes(v1, state)
    videos.routes(v1, state)
    _info_routes(app, v1, state)
    app.include_router(v1)
    return app


def _api_key_checker(state: ServerState):
    async def check(request: Request) -> None:
        key = state.settings.api_key
        if key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY' (--api-key / DFUSE_API_KEY)",
                           code="invalid_api_key")

    return check


def _image_routes(v1: APIRouter, state: ServerState) -> None:
    @v1.post("/images/generations")
    async def generate_images(request: Request):
        try:
            return await _generate_images(request)
        except ClientGone:
            return Response(status_code=499)  # nobody reads it; counted as cancelled

    async def _generate_images(request: Request):
        started = time.perf_counter()
        with state.outcome("images"):
            engine = state.require_engine()
            body = images.parse(await read_json(request, state.settings.max_body_bytes), state.settings.model_name)
            height, width = images.parse_size(body.size)
            fields = dict(negative_prompt=body.negative_prompt, num_inference_steps=body.num_inference_steps,
                          guidance_scale=body.guidance_scale, true_cfg_scale=body.true_cfg_scale, height=height,
                          width=width, seed=body.seed, priority=body.priority, timeout=body.timeout)
            if engine.model_info.video:
                fields["num_frames"] = 1  # one frame of a video model is an image
            try:
                future = state.submit(engine, [body.prompt] * body.n, **fields)
            except APIError as e:
                raise images.size_error(e.message) or e from None
            result = await state.wait(future, request)
            fmt = body.output_format or "png"
            encoded = await state.run_blocking(
                lambda: [images.encode(image, fmt, body.output_compression) for image in result.images])
            data = []
            for payload, seed, warnings in zip(encoded, result.seeds, result.warnings or [[]] * len(encoded)):
                if body.response_format == "url":
                    name = state.files.put(payload, fmt, images.FORMATS[fmt][1])
                    item = {"url": f"{request.base_url}files/{name}", "seed": seed}
                else:
                    item = {"b64_json": base64.b64encode(payload).decode("ascii"), "seed": seed}
                if warnings:  # e.g. the part of the prompt a text encoder cut off
                    item["warnings"] = warnings
                data.append(item)
            first = result.images[0]
            state.metrics.latency.labels("images").observe(time.perf_counter() - started)
            return {"created": int(time.time()), "data": data, "output_format": fmt,
                    "size": f"{first.width}x{first.height}"}


def _info_routes(app: FastAPI, v1: APIRouter, state: ServerState) -> None:
    @v1.get("/models")
    async def list_models():
        engine = state.engine
        entry = {"id": state.settings.model_name, "object": "model", "created": state.created, "owned_by": "dfuse"}
        if engine is not None:
            entry["family"] = engine.model_info.family
            entry["video"] = engine.model_info.video
        return {"object": "list", "data": [entry]}

    @v1.get("/stats")
    async def stats():
        engine = state.engine if state.draining and state.engine is not None else state.require_engine()
        body = engine.stats().to_dict()
        body["server"] = {"inflight": state.inflight, "max_queue": state.settings.max_queue,
                          "draining": state.draining, "model_name": state.settings.model_name}
        return body

    @app.get("/health")
    async def health():
        status, detail = _health(state)
        return JSONResponse({"status": status, **detail}, status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/files/{name}")
    async def served_file(name: str):
        stored = state.files.get(name)
        if stored is None:
            raise APIError(404, "no such file, or it expired (--url-ttl)", code="file_not_found")
        return FileResponse(stored.path, media_type=stored.media_type)

    page = importlib.resources.files(__package__).joinpath("static/status.html")

    @app.get("/", response_class=HTMLResponse)
    async def status_page():
        return HTMLResponse(page.read_text(encoding="utf-8"))


def _health(state: ServerState) -> tuple[str, dict]:
    """ok only when the engine serves with every worker ready; otherwise why not."""
    if state.draining:
        return "draining", {}
    if state.engine_error:
        return "failed", {"error": state.engine_error}
    if state.engine is None:
        return "starting", {}
    workers = state.engine.stats().workers
    not_ready = {str(w.id): w.state for w in workers if not w.ready}
    if not_ready:
        return "degraded", {"workers_not_ready": not_ready}
    return "ok", {"workers": len(workers)}

"""/v1/videos: OpenAI's asynchronous video jobs on a video model (Wan).

POST creates a job and returns at once (status queued); the engine's progress callback moves it
to in_progress with progress from the DiT's steps; when the engine finishes, the MP4 is encoded on
the encoder threads and the job becomes completed (its content served for --url-ttl seconds) or
failed with the engine's error. A job never stays in_progress after its request ended: every way
the engine's future can end (result, error, cancel) settles the job. DELETE cancels a job that
is still running and forgets it.

The openai client sends POST /v1/videos as multipart/form-data (fields are strings there), other
clients JSON: both are read into one typed body."""

from __future__ import annotations

import itertools
import secrets
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import APIError
from .images import first_error, parse_size, size_error
from .state import ServerState, read_json

MAX_JOBS = 1000  # finished jobs beyond this are forgotten, oldest first
DEFAULT_FPS = 16  # Wan2.1 is trained at 16 fps


class VideoRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str
    model: str | None = None
    size: str | None = None  # "WxH"
    seconds: float | None = Field(None, gt=0)  # OpenAI's length; num_frames wins when both are given
    fps: int = Field(DEFAULT_FPS, ge=1, le=240)
    num_frames: int | None = None
    seed: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    priority: int = 0
    timeout: float | None = None
    user: str | None = None


@dataclass
class VideoJob:
    id: str
    model: str
    prompt: str
    size: str
    fps: int
    num_frames: int
    created_at: int = field(default_factory=lambda: int(time.time()))
    started: float = field(default_factory=time.perf_counter)
    status: str = "queued"
    progress: int = 0
    completed_at: int | None = None
    expires_at: int | None = None
    error: dict | None = None
    seed: int | None = None
    file: str | None = None  # its MP4 in the server's FileStore
    future: Future | None = None

    def to_dict(self) -> dict:
        return {"id": self.id, "object": "video", "model": self.model, "status": self.status,
                "progress": self.progress, "created_at": self.created_at, "completed_at": self.completed_at,
                "expires_at": self.expires_at, "error": self.error, "prompt": self.prompt, "size": self.size,
                "seconds": f"{self.num_frames / self.fps:g}", "num_frames": self.num_frames, "fps": self.fps,
                "seed": self.seed}


class VideoJobs:
    def __init__(self, state: ServerState):
        self.state = state
        self.jobs: dict[str, VideoJob] = {}  # oldest first
        self.lock = threading.Lock()
        self._ids = itertools.count()

    def create(self, body: VideoRequest) -> VideoJob:
        engine = self.state.require_engine()
        info = engine.model_info
        if not info.video:
            raise APIError(400, f"model: {self.state.settings.model_name} ({info.family}) makes images; "
                           "use POST /v1/images/generations", param="model", code="not_a_video_model")
        height, width = parse_size(body.size)
        num_frames = body.num_frames
        if num_frames is None and body.seconds is not None:
            # The nearest length the VAE allows: frame_step * k + 1 frames.
            num_frames = info.frame_step * max(0, round(body.seconds * body.fps / info.frame_step)) + 1
            if num_frames > info.max_frames:
                raise APIError(400, f"seconds: {body.seconds:g} s at {body.fps} fps is {num_frames} frames; this model "
                               f"makes at most {info.max_frames} ({info.max_frames / body.fps:g} s)",
                               param="seconds", code="invalid_value")
        job = VideoJob(id=f"video_{secrets.token_hex(12)}", model=self.state.settings.model_name, prompt=body.prompt,
                       size="", fps=body.fps, num_frames=0)
        try:
            job.future = self.state.submit(
                engine, [body.prompt], negative_prompt=body.negative_prompt, num_inference_steps=body.num_inference_steps,
                guidance_scale=body.guidance_scale, height=height, width=width, seed=body.seed, priority=body.priority,
                timeout=body.timeout, num_frames=num_frames, on_progress=lambda stage, step, total: self._progress(job, step, total))
        except APIError as e:
            raise size_error(e.message) or e from None
        default_height, default_width = info.default_height_width
        job.size = f"{width or default_width}x{height or default_height}"
        job.num_frames = num_frames or info.default_frames
        with self.lock:
            self.jobs[job.id] = job
            self._forget_old()
        job.future.add_done_callback(lambda f: self._finished(job, f))
        return job

    def get(self, video_id: str) -> VideoJob:
        with self.lock:
            job = self.jobs.get(video_id)
        if job is None:
            raise APIError(404, f"no video job {video_id!r} (deleted, or forgotten after --url-ttl)", param="video_id",
                           code="video_not_found")
        return job

    def delete(self, video_id: str) -> VideoJob:
        job = self.get(video_id)
        with self.lock:
            self.jobs.pop(video_id, None)
        job.future.cancel()  # a running job stops: dropped between stages, the DiT at its next step
        if job.file:
            self.state.files.remove(job.file)
        return job

    def _progress(self, job: VideoJob, step: int, total: int) -> None:
        """The DiT's steps are 0-95 %; decoding and encoding the MP4 the rest."""
        if job.status == "queued":
            job.status = "in_progress"
        job.progress = max(job.progress, min(95, int(95 * step / max(1, total))))

    def _finished(self, job: VideoJob, future: Future) -> None:
        """On the engine's completion thread: hand the encoding to the encoder threads at once."""
        if future.cancelled():
            self._fail(job, "cancelled", "the job was cancelled")
            return
        error = future.exception()
        if error is not None:
            self._fail(job, type(error).__name__, str(error))
            return
        result = future.result()
        job.seed = result.seeds[0]
        job.status, job.progress = "in_progress", max(job.progress, 96)
        try:
            self.state.encoder_pool.submit(self._encode, job, result.frames[0])
        except RuntimeError:  # the server is shutting down: its encoder threads are gone
            self._fail(job, "shutdown", "the server shut down before the video was encoded")

    def _encode(self, job: VideoJob, frames) -> None:
        from diffusers.utils import export_to_video

        try:
            job.file = self.state.files.write(lambda path: export_to_video(frames, path, fps=job.fps), "mp4", "video/mp4")
        except Exception as e:  # noqa: BLE001 - whatever the encoder raised, the job must not stay in_progress
            self._fail(job, "encoding_failed", f"{type(e).__name__}: {e}")
            return
        job.completed_at = int(time.time())
        job.expires_at = job.completed_at + int(self.state.settings.url_ttl_s)
        job.status, job.progress = "completed", 100
        self.state.metrics.latency.labels("videos").observe(time.perf_counter() - job.started)
        self.state.metrics.requests.labels("videos", "completed").inc()

    def _fail(self, job: VideoJob, code: str, message: str) -> None:
        job.status, job.error, job.completed_at = "failed", {"code": code, "message": message}, int(time.time())
        outcome = {"cancelled": "cancelled", "RequestTimeout": "timeout"}.get(code, "failed")
        self.state.metrics.requests.labels("videos", outcome).inc()

    def _forget_old(self) -> None:
        finished = [j.id for j in self.jobs.values() if j.status in ("completed", "failed")]
        for video_id in finished[: max(0, len(self.jobs) - MAX_JOBS)]:
            self.jobs.pop(video_id)

    def listing(self, limit: int, order: str, after: str | None) -> dict:
        with self.lock:
            jobs = list(self.jobs.values())
        if order == "desc":
            jobs.reverse()
        if after is not None:
            ids = [j.id for j in jobs]
            jobs = jobs[ids.index(after) + 1:] if after in ids else []
        page = jobs[:limit]
        return {"object": "list", "data": [j.to_dict() for j in page], "first_id": page[0].id if page else None,
                "last_id": page[-1].id if page else None, "has_more": len(jobs) > limit}


async def _read_body(request: Request, state: ServerState) -> VideoRequest:
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data") or content_type.startswith("application/x-www-form-urlencoded"):
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > state.settings.max_body_bytes:
            raise APIError(413, f"the request body is {declared} bytes; at most {state.settings.max_body_bytes} "
                           "are accepted", code="body_too_large")
        form = await request.form(max_files=0, max_fields=64)
        raw = {k: v for k, v in form.items() if isinstance(v, str)}
    else:
        raw = await read_json(request, state.settings.max_body_bytes)
        if not isinstance(raw, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        body = VideoRequest.model_validate(raw)
    except ValidationError as e:
        raise first_error(e) from None
    if body.model is not None and body.model != state.settings.model_name:
        raise APIError(404, f"model: this server serves {state.settings.model_name!r}, not {body.model!r}",
                       param="model", code="model_not_found")
    return body


def routes(v1: APIRouter, state: ServerState) -> None:
    jobs = VideoJobs(state)
    state.videos = jobs

    @v1.post("/videos")
    async def create_video(request: Request):
        with state.outcome("videos", success=None):  # a job's own end is counted when it ends
            state.require_engine()
            return jobs.create(await _read_body(request, state)).to_dict()

    @v1.get("/videos")
    async def list_videos(limit: int = Query(20, ge=1, le=100), order: str = "desc", after: str | None = None):
        if order not in ("asc", "desc"):
            raise APIError(400, f"order: must be 'asc' or 'desc' (got {order!r})", param="order", code="invalid_value")
        return jobs.listing(limit, order, after)

    @v1.get("/videos/{video_id}")
    async def get_video(video_id: str):
        return jobs.get(video_id).to_dict()

    @v1.get("/videos/{video_id}/content")
    async def video_content(video_id: str):
        job = jobs.get(video_id)
        if job.status != "completed":
            raise APIError(404, f"video {video_id} is {job.status} ({job.progress}%); its content is there once "
                           "status is completed", param="video_id", code="video_not_ready")
        stored = state.files.get(job.file) if job.file else None
        if stored is None:
            raise APIError(404, f"video {video_id}'s content expired (--url-ttl)", param="video_id", code="video_expired")
        return FileResponse(stored.path, media_type="video/mp4", filename=f"{video_id}.mp4")

    @v1.delete("/videos/{video_id}")
    async def delete_video(video_id: str):
        job = jobs.delete(video_id)
        return {"id": job.id, "object": "video.deleted", "deleted": True}

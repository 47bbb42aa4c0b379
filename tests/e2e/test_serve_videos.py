"""Video jobs over HTTP (tiny-wan) with the official client: create, poll progress, download the
MP4 (its frames equal the Engine's video within MP4's lossy coding), list, cancel a running job,
and the server serves on after it."""

import time

import httpx2 as httpx
import imageio.v3 as iio
import numpy as np
import openai
import pytest

pytestmark = pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")  # the client warns about OpenAI's own service

EXTRA = {"seed": 3, "num_inference_steps": 2, "num_frames": 5, "fps": 8}


@pytest.fixture(scope="module")
def wan_server():
    from serve_process import serving

    from dfuse.engine.models.tiny import tiny_model_path

    yield from serving("--model", str(tiny_model_path("tiny-wan")), "--served-model-name", "tiny-wan")


@pytest.fixture(scope="module")
def client(wan_server):
    return openai.OpenAI(base_url=f"{wan_server.url}/v1", api_key="none", max_retries=0, timeout=120)


def _wait(client, video_id: str, timeout_s: float = 120.0, until=("completed", "failed")):
    deadline, seen = time.monotonic() + timeout_s, []
    while time.monotonic() < deadline:
        video = client.videos.retrieve(video_id)
        seen.append((video.status, video.progress))
        if video.status in until:
            return video, seen
        time.sleep(0.05)
    raise AssertionError(f"video {video_id} still {seen[-1]} after {timeout_s} s")


def test_a_video_job_runs_to_completion_and_its_mp4_downloads(client):
    job = client.videos.create(model="tiny-wan", prompt="a red fox running", size="64x64", extra_body=EXTRA)
    assert job.object == "video" and job.status in ("queued", "in_progress") and job.size == "64x64"
    video, seen = _wait(client, job.id)
    assert video.status == "completed" and video.progress == 100 and video.error is None
    progress = [p for _, p in seen]
    assert progress == sorted(progress)  # never goes backwards
    content = client.videos.download_content(job.id).read()
    frames = iio.imread(content, extension=".mp4")
    assert frames.shape[:3] == (5, 64, 64)
    listed = client.videos.list()
    assert job.id in [v.id for v in listed.data]


def test_the_mp4_holds_the_engines_frames(client):
    """MP4 (H.264) is lossy: frames match the Engine's closely, not bit for bit."""
    from dfuse import Engine
    from dfuse.engine.models.tiny import tiny_model_path

    job = client.videos.create(model="tiny-wan", prompt="waves", size="64x64", extra_body=EXTRA)
    video, _ = _wait(client, job.id)
    assert video.status == "completed"
    got = iio.imread(client.videos.download_content(job.id).read(), extension=".mp4").astype(float)
    with Engine(model=str(tiny_model_path("tiny-wan")), cpu_threads=1) as engine:
        (want,) = engine.generate("waves", height=64, width=64, seed=3, num_inference_steps=2, num_frames=5)
    want = np.stack([np.array(f) for f in want]).astype(float)
    other = np.roll(want, 1, axis=0)  # the same frames out of order: what a mix-up would look like
    assert np.abs(got - want).mean() < np.abs(got - other).mean() / 2


def test_deleting_a_running_job_cancels_it_and_the_server_serves_on(client, wan_server):
    slow = client.videos.create(model="tiny-wan", prompt="a long one", size="64x64",
                                extra_body={**EXTRA, "num_inference_steps": 1000})
    _wait(client, slow.id, until=("in_progress",))
    deleted = client.videos.delete(slow.id)
    assert deleted.deleted and deleted.id == slow.id
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(slow.id)
    quick = client.videos.create(model="tiny-wan", prompt="after", size="64x64", extra_body=EXTRA)
    video, _ = _wait(client, quick.id)
    assert video.status == "completed"  # the cancelled job's 1000 steps did not run on
    stats = httpx.get(f"{wan_server.url}/v1/stats", timeout=30).json()
    assert stats["server"]["inflight"] == 0 and all(n == 0 for n in stats["queues"].values())


def test_bad_video_requests_name_the_field(client, wan_server):
    with pytest.raises(openai.BadRequestError, match="num_frames"):
        client.videos.create(prompt="x", extra_body={"num_frames": 6})
    with pytest.raises(openai.BadRequestError, match="seconds"):
        client.videos.create(prompt="x", seconds="12", extra_body={"fps": 240})  # 2,881 frames: too long
    r = httpx.get(f"{wan_server.url}/v1/videos/video_nope", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["param"] == "video_id"

"""dfuse serve as users call it: the official `openai` client against a live server on loopback.
Images equal the in-process Engine's, pixel for pixel; every refusal is OpenAI's error object with
the right status and the field named."""

import base64
import io
import re

import httpx2 as httpx  # what the openai client itself uses
import numpy as np
import openai
import pytest
from PIL import Image

KEY = "test-key-123"
PARAMS = {"seed": 5, "num_inference_steps": 2, "guidance_scale": 4.5, "negative_prompt": "blurry"}


@pytest.fixture(scope="module")
def server(model_path):
    from serve_process import serving

    yield from serving("--model", str(model_path), "--api-key", KEY, "--max-queue", "4", "--served-model-name", "tiny-sd3")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def _pixels(b64: str) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(base64.b64decode(b64))))


def test_images_equal_the_engines_and_n_uses_consecutive_seeds(client, engine):
    r = client.images.generate(model="tiny-sd3", prompt="a red fox", size="64x64", n=2, response_format="b64_json",
                               extra_body=PARAMS)
    assert len(r.data) == 2
    expected = engine.generate(["a red fox", "a red fox"], height=64, width=64, **PARAMS)  # seeds 5 and 6
    for got, want in zip(r.data, expected):
        assert np.array_equal(_pixels(got.b64_json), np.array(want))
    assert [d.model_extra["seed"] for d in r.data] == [5, 6]
    assert not np.array_equal(_pixels(r.data[0].b64_json), _pixels(r.data[1].b64_json))


def test_url_responses_serve_the_file_and_other_formats_decode(client, engine):
    r = client.images.generate(prompt="a red fox", size="64x64", response_format="url", extra_body=PARAMS)
    fetched = httpx.get(r.data[0].url, timeout=30)
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    (want,) = engine.generate("a red fox", height=64, width=64, **PARAMS)
    assert np.array_equal(np.array(Image.open(io.BytesIO(fetched.content))), np.array(want))
    r = client.images.generate(prompt="a red fox", size="64x64", output_format="jpeg", extra_body=PARAMS)
    image = Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json)))
    assert image.format == "JPEG" and image.size == (64, 64)


@pytest.mark.parametrize("fields, param, message", [
    ({"size": "64by64"}, "size", "WIDTHxHEIGHT"),
    ({"size": "65x64"}, "size", "multiple of 16"),
    ({"n": 11}, "n", "less than or equal to 10"),
    ({"n": 0}, "n", "greater than or equal to 1"),
    ({"num_inference_steps": 0}, "num_inference_steps", "[1, 1000]"),
    ({"guidance_scale": -1}, "guidance_scale", "[0, 100]"),
    ({"seed": "five"}, "seed", "integer"),
    ({"response_format": "bmp"}, "response_format", "b64_json"),
    ({"num_steps": 4}, "num_steps", "unknown field"),
    ({"prompt": "x" * 10_001}, "prompt", "10000 characters"),
    ({"priority": 5000}, "priority", "[-1000, 1000]"),
    ({"output_compression": 50}, "output_compression", "jpeg or webp"),
])
def test_bad_fields_get_400_naming_the_field(server, fields, param, message):
    body = {"prompt": "a fox", "size": "64x64", "num_inference_steps": 1, **fields}
    r = httpx.post(f"{server.url}/v1/images/generations", json=body, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and message in error["message"] and error["type"] == "invalid_request_error"


def test_the_openai_client_raises_its_own_errors_with_our_message(client, server):
    with pytest.raises(openai.BadRequestError, match="size"):
        client.images.generate(prompt="a fox", size="huge")
    with pytest.raises(openai.NotFoundError, match="tiny-sd3"):
        client.images.generate(model="dall-e-3", prompt="a fox")
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.images.generate(prompt="a fox")
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_server_refusals_of_its_own(server):
    auth = {"Authorization": f"Bearer {KEY}"}
    url = f"{server.url}/v1/images/generations"
    r = httpx.post(url, content=b"{not json", headers={**auth, "content-type": "application/json"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(url, content=b'{"prompt": "' + b"x" * (2 << 20) + b'"}', headers=auth, timeout=30)
    assert r.status_code == 413 and "bytes" in r.json()["error"]["message"]
    # --max-queue 4: five images at once can never be admitted
    r = httpx.post(url, json={"prompt": "a fox", "n": 5, "size": "64x64"}, headers=auth, timeout=30)
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1 and "--max-queue" in r.json()["error"]["message"]
    r = httpx.get(f"{server.url}/v1/nothing-here", headers=auth, timeout=30)
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(f"{server.url}/files/not-a-file.png", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "file_not_found"
    assert httpx.get(f"{server.url}/v1/stats", timeout=30).status_code == 401  # no key


def test_models_health_stats_and_metrics_that_move(client, server):
    (model,) = client.models.list().data
    assert model.id == "tiny-sd3" and model.model_extra["family"] == "sd3"
    health = httpx.get(f"{server.url}/health", timeout=30)
    assert health.status_code == 200 and health.json()["workers"] == 3

    def completed() -> float:
        text = httpx.get(f"{server.url}/metrics", timeout=30).text
        match = re.search(r'^dfuse_requests_total\{endpoint="images",outcome="completed"\} (\S+)$', text, re.M)
        return float(match[1]) if match else 0.0

    before = completed()
    client.images.generate(prompt="a fox", size="64x64", extra_body={"num_inference_steps": 1})
    assert completed() == before + 1
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    for family in ("dfuse_request_latency_seconds_count", "dfuse_request_queue_time_seconds_count",
                   'dfuse_stage_compute_seconds_count{device="cpu",stage="dit"}', 'dfuse_handoff_seconds_count{link="dit->decoder"}',
                   'dfuse_queue_depth{stage="dit"}', 'dfuse_workers{device="cpu",stage="encoder"} 1.0',
                   'dfuse_worker_restarts_total{stage="dit"} 0.0', "dfuse_requests_running 0.0"):
        assert family in text, family
    stats = httpx.get(f"{server.url}/v1/stats", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()
    assert stats["completed"] >= 1 and stats["server"]["max_queue"] == 4
    last = stats["recent"][-1]
    assert last["outcome"] == "completed" and list(last["stages"]) == ["encoder", "dit", "decoder"]
    spans = [last["stages"][s] for s in ("encoder", "dit", "decoder")]
    assert all(s["queued_s"] <= s["started_s"] <= s["finished_s"] for s in spans)
    assert spans[0]["finished_s"] <= spans[1]["finished_s"] <= spans[2]["finished_s"]


def test_a_prompt_cut_by_the_text_encoder_says_so_in_the_response(client):
    r = client.images.generate(prompt="a red fox " * 60, size="64x64", extra_body={"num_inference_steps": 1})
    (warning, *_) = r.data[0].model_extra["warnings"]
    assert "longer than CLIP's 77 tokens; this part was cut" in warning and "a red fox" in warning
    short = client.images.generate(prompt="a red fox", size="64x64", extra_body={"num_inference_steps": 1})
    assert "warnings" not in short.data[0].model_extra

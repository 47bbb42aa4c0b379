"""Model family detection: a clear ValueError naming `model` for every unusable folder."""
import json
import os
import shutil
import threading

import pytest

from dfuse.engine.models import SPECS, describe_model, detect_family
from dfuse.engine.models.flux import FluxSpec
from dfuse.engine.models.pixart import PixArtSigmaSpec
from dfuse.engine.models.sd3 import SD3Spec
from dfuse.engine.models.tiny import tiny_model_path


def _model_error(call, path) -> str:
    with pytest.raises(ValueError) as info:
        call(path)
    message = str(info.value)
    assert message.startswith("model:"), message
    return message


@pytest.mark.parametrize("call", [detect_family, describe_model])
def test_missing_folder(tmp_path, call):
    assert "not a directory" in _model_error(call, tmp_path / "missing")


@pytest.mark.parametrize("call", [detect_family, describe_model])
def test_a_file_is_not_a_model_folder(tmp_path, call):
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 8)
    assert "not a directory" in _model_error(call, tmp_path / "model.safetensors")


@pytest.mark.parametrize("call", [detect_family, describe_model])
def test_folder_without_model_index(tmp_path, call):
    message = _model_error(call, tmp_path)
    assert "model_index.json" in message and "StableDiffusion3Pipeline" in message


@pytest.mark.parametrize(
    "content",
    ['{"_class_name": "StableDiffusion3Pipeline"', "not json", "", "[1, 2]", '{"_diffusers_version": "0.30"}', "\udcff"],
    ids=["truncated", "not_json", "empty", "a_list", "no_class_name", "bad_utf8"],
)
def test_unreadable_model_index(tmp_path, content):
    (tmp_path / "model_index.json").write_bytes(content.encode("utf-8", "surrogateescape"))
    message = _model_error(detect_family, tmp_path)
    assert "model_index.json" in message and "StableDiffusion3Pipeline" in message


@pytest.mark.parametrize("class_name", ["PixArtAlphaPipeline", "StableDiffusionXLPipeline", "FluxImg2ImgPipeline", None, 3])
def test_unsupported_pipeline_lists_the_supported_ones(tmp_path, class_name):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    message = _model_error(detect_family, tmp_path)
    assert "not supported" in message and repr(class_name) in message
    assert "FluxPipeline, PixArtSigmaPipeline, StableDiffusion3Pipeline" in message


@pytest.mark.parametrize("class_name, family", [("FluxPipeline", FluxSpec), ("PixArtSigmaPipeline", PixArtSigmaSpec)])
def test_detected_from_model_index_class_name(tmp_path, class_name, family):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    assert isinstance(detect_family(tmp_path), family)
    assert f"not a complete {class_name} folder" in _model_error(describe_model, tmp_path)


def test_unhashable_class_name(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": ["StableDiffusion3Pipeline"]}))
    _model_error(detect_family, tmp_path)


def test_sd3_index_without_component_configs(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    assert isinstance(detect_family(tmp_path), SD3Spec)
    message = _model_error(describe_model, tmp_path)
    assert "not a complete StableDiffusion3Pipeline folder" in message


def test_sd3_with_a_broken_transformer_config(tmp_path):
    shutil.copytree(tiny_model_path(), tmp_path / "m", ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    (tmp_path / "m" / "transformer" / "config.json").write_text("{}")
    assert "not a complete StableDiffusion3Pipeline folder" in _model_error(describe_model, tmp_path / "m")


def test_tiny_model_is_detected_and_described():
    path = tiny_model_path()
    assert SPECS["StableDiffusion3Pipeline"] is detect_family(path)
    info = describe_model(str(path))
    assert info.family == "sd3" and info.path == path.resolve()
    assert (info.pixel_multiple, info.default_size, info.max_size) == (16, 128, 1024)
    assert info.num_inference_steps == 28 and info.guidance_scale == 7.0


def test_tiny_flux_is_detected_and_described():
    path = tiny_model_path("tiny-flux")
    assert SPECS["FluxPipeline"] is detect_family(path)
    info = SPECS["FluxPipeline"].describe(path)  # the pipeline class's own defaults
    assert info.family == "flux" and info.true_cfg
    # FluxPipeline's defaults: 1024 px (128 latent pixels x 8), 28 steps, embedded guidance 3.5.
    assert (info.pixel_multiple, info.default_size) == (16, 1024)
    assert info.num_inference_steps == 28 and info.guidance_scale == 3.5
    assert info.dims["text_tokens"] == 512 and info.dims["patch"] == 2
    # The tiny model's dfuse.json makes 128 px the default (1024 px takes ~10 s on a CPU).
    served = describe_model(path)
    assert served.default_height_width == (128, 128) and served.num_inference_steps == 28


def test_tiny_pixart_is_detected_and_described():
    path = tiny_model_path("tiny-pixart")
    assert SPECS["PixArtSigmaPipeline"] is detect_family(path)
    info = describe_model(path)
    assert info.family == "pixart" and not info.true_cfg
    assert (info.pixel_multiple, info.default_size) == (16, 128)  # transformer sample_size 16 x 8
    assert info.num_inference_steps == 20 and info.guidance_scale == 4.5
    assert info.dims["text_tokens"] == 300


def test_tiny_wan_is_detected_and_described():
    path = tiny_model_path("tiny-wan")
    assert SPECS["WanPipeline"] is detect_family(path)
    info = SPECS["WanPipeline"].describe(path)  # the pipeline class's own defaults
    assert info.family == "wan" and info.video and not info.true_cfg
    # WanPipeline's defaults: 480 x 832, 81 frames (4k + 1: the VAE's x4 time compression), 50 steps, CFG 5.
    assert info.default_height_width == (480, 832) and info.pixel_multiple == 16
    assert (info.default_frames, info.frame_step, info.max_frames) == (81, 4, 1025)
    assert info.num_inference_steps == 50 and info.guidance_scale == 5.0
    assert info.dims["text_tokens"] == 512
    # The tiny model's dfuse.json: 9 frames of 112 x 64 (81 frames of 832 x 480 overflow a transport slot).
    served = describe_model(path)
    assert served.default_height_width == (64, 112) and served.default_frames == 9


def _with_dfuse_json(tmp_path, content):
    folder = tmp_path / "m"
    shutil.copytree(tiny_model_path(), folder)
    (folder / "dfuse.json").write_text(content)
    return folder


@pytest.mark.parametrize("content, message", [
    ('{"defaults": {"height": 96, "width": 64, "num_inference_steps": 4}}', None),
    ('{"defaults": {"seed": 1}}', "unknown default(s) ['seed']; allowed: height, width, num_frames"),
    ('{"defaults": {"height": 100}}', "defaults.height must be a multiple of 16 in [16, 1024] (got 100)"),
    ('{"defaults": {"num_frames": 9}}', "defaults.num_frames must be 1k+1 in [1, 1] (got 9)"),
    ('{"defaults": {"width": "64"}}', "defaults.width must be a positive integer (got '64')"),
    ('{"height": 64}', 'must hold {"defaults": {...}}'),
    ("not json", 'must hold {"defaults": {...}}'),
])
def test_a_folders_serving_defaults_are_checked_and_applied(tmp_path, content, message):
    folder = _with_dfuse_json(tmp_path, content)
    if message is None:
        info = describe_model(folder)
        assert info.default_height_width == (96, 64) and info.num_inference_steps == 4
    else:
        assert message in _model_error(describe_model, folder) and "dfuse.json" in _model_error(describe_model, folder)


def test_image_families_describe_one_frame():
    for name in ("tiny-sd3", "tiny-flux", "tiny-pixart"):
        info = describe_model(tiny_model_path(name))
        assert not info.video and info.max_frames == 1 and info.default_height_width == (info.default_size,) * 2


def _error_within(call, path, timeout: float = 30) -> str:
    """_model_error, failing instead of hanging if `call` blocks (e.g. on a FIFO)."""
    outcome = []
    thread = threading.Thread(target=lambda: outcome.append(_model_error(call, path)), daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else "still blocked"


def _unblock(fifo):
    """Give a reader stuck on `fifo` its EOF, so no thread stays blocked after the test."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:  # no reader left
        pass


@pytest.mark.parametrize("where", ["model_index.json", "transformer/config.json"])
def test_a_fifo_in_place_of_a_json_file_is_refused_not_waited_on(tmp_path, where):
    folder = tmp_path / "m"
    shutil.copytree(tiny_model_path(), folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    (folder / where).unlink()
    os.mkfifo(folder / where)
    try:
        message = _error_within(describe_model, folder)
        assert message != "still blocked"
        assert "no readable model_index.json" in message or "config.json is not a regular file" in message, message
    finally:
        _unblock(folder / where)


def test_a_deeply_nested_model_index_is_refused_clearly(tmp_path):
    (tmp_path / "model_index.json").write_text("[" * 100_000 + "]" * 100_000)
    assert "not a diffusers pipeline folder" in _model_error(detect_family, tmp_path)


def test_a_huge_model_index_is_not_read(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline",
                                                           "padding": "x" * (2 << 20)}))
    assert "not a diffusers pipeline folder" in _model_error(detect_family, tmp_path)


def test_a_serving_default_out_of_a_requests_range_is_refused_at_load(tmp_path):
    from dfuse.engine.requests import MAX_STEPS

    folder = tmp_path / "m"
    shutil.copytree(tiny_model_path(), folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    (folder / "dfuse.json").write_text(json.dumps({"defaults": {"num_inference_steps": MAX_STEPS + 1}}))
    message = _model_error(describe_model, folder)
    assert "dfuse.json" in message and "defaults.num_inference_steps" in message and str(MAX_STEPS) in message

"""Tiny random models (SD3, Flux, PixArt-Sigma): byte-deterministic builds, cache path, real diffusers loading."""
import os
import pathlib
import threading

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dfuse.engine.models import tiny  # noqa: E402


def _files(root: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", sorted(tiny.TINY_MODELS))
def test_two_builds_are_byte_identical(tmp_path, name):
    tiny.TINY_MODELS[name](tmp_path / "a")
    tiny.TINY_MODELS[name](tmp_path / "b")
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert "model_index.json" in a and "transformer/diffusion_pytorch_model.safetensors" in a
    assert sorted(a) == sorted(b)
    for file in a:
        assert a[file] == b[file], (name, file)


def test_unknown_name_raises(tmp_path, monkeypatch):
    monkeypatch.setenv("DFUSE_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="tiny-sd3"):
        tiny.tiny_model_path("no-such-model")


def test_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DFUSE_CACHE", str(tmp_path))
    assert tiny.cache_dir() == tmp_path
    monkeypatch.delenv("DFUSE_CACHE")
    assert tiny.cache_dir() == pathlib.Path.home() / ".cache" / "dfuse"


def test_concurrent_callers_share_one_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("DFUSE_CACHE", str(tmp_path))
    paths, errors = [], []

    def call():
        try:
            paths.append(tiny.tiny_model_path("tiny-sd3"))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    expected = tmp_path / "models" / f"tiny-sd3-v{tiny.BUILDER_VERSION}"
    assert paths == [expected] * 3
    assert [p.name for p in (tmp_path / "models").iterdir()] == [expected.name]  # no temp left
    # rebuild=True replaces the folder with identical bytes
    before = _files(expected)
    assert tiny.tiny_model_path("tiny-sd3", rebuild=True) == expected
    assert _files(expected) == before


def test_pipeline_loads_and_generates(tmp_path, monkeypatch):
    import torch
    from diffusers import AutoencoderKL, StableDiffusion3Pipeline

    monkeypatch.setenv("DFUSE_CACHE", str(tmp_path))
    path = tiny.tiny_model_path()
    pipe = StableDiffusion3Pipeline.from_pretrained(path)
    img = pipe(
        "a red fox in the snow", negative_prompt="blurry", num_inference_steps=2,
        guidance_scale=4.5, height=64, width=96, generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert img.size == (96, 64)  # PIL size is (width, height)
    assert np.asarray(img).std() > 0  # not one colour

    vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
    assert vae.config.latent_channels == 16 and vae.config.scaling_factor == 1.5305
    enc = StableDiffusion3Pipeline.from_pretrained(path, transformer=None, vae=None)
    assert enc.transformer is None and enc.text_encoder_3 is not None
    dit = StableDiffusion3Pipeline.from_pretrained(
        path, text_encoder=None, text_encoder_2=None, text_encoder_3=None,
        tokenizer=None, tokenizer_2=None, tokenizer_3=None, vae=None,
    )
    assert dit.transformer is not None and dit.text_encoder is None


@pytest.mark.parametrize("name, pipeline, latent_channels, scaling", [
    ("tiny-flux", "FluxPipeline", 16, 0.3611), ("tiny-pixart", "PixArtSigmaPipeline", 4, 0.13025),
])
def test_other_families_load_with_their_pipeline(tmp_path, monkeypatch, name, pipeline, latent_channels, scaling):
    import diffusers
    import torch

    monkeypatch.setenv("DFUSE_CACHE", str(tmp_path))
    path = tiny.tiny_model_path(name)
    assert path.name == f"{name}-v{tiny.BUILDER_VERSION}"
    pipe = getattr(diffusers, pipeline).from_pretrained(path)
    assert type(pipe).__name__ == pipeline
    assert pipe.vae.config.latent_channels == latent_channels and pipe.vae.config.scaling_factor == scaling
    extra = {"use_resolution_binning": False, "clean_caption": False} if name == "tiny-pixart" else {}
    img = pipe("a red fox", num_inference_steps=2, height=32, width=48,
               generator=torch.Generator().manual_seed(0), **extra).images[0]
    assert img.size == (48, 32) and np.asarray(img).std() > 0


def test_tiny_wan_loads_with_its_pipeline_and_makes_a_video(tmp_path, monkeypatch):
    import torch
    from diffusers import AutoencoderKLWan, WanPipeline

    monkeypatch.setenv("DFUSE_CACHE", str(tmp_path))
    path = tiny.tiny_model_path("tiny-wan")
    pipe = WanPipeline.from_pretrained(path)  # needs accelerate (WanTransformer3DModel keeps fp32 modules)
    vae = pipe.vae
    assert isinstance(vae, AutoencoderKLWan) and vae.config.z_dim == 16
    assert (vae.config.scale_factor_temporal, vae.config.scale_factor_spatial) == (4, 8)
    frames = pipe("a red fox", num_inference_steps=2, height=32, width=48, num_frames=5, output_type="np",
                  generator=torch.Generator().manual_seed(0)).frames[0]
    assert frames.shape == (5, 32, 48, 3) and frames.std() > 0
    assert not np.array_equal(frames[0], frames[-1])  # frames differ: a video, not a still

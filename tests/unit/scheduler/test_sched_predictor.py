"""Predictor: the fit recovers known costs (held-out error), memory and streaming, published profiles."""

import json
import math
import random
from pathlib import Path

import pytest
from conftest import BASE, make_predictor

from dfuse.scheduler.core import STAGES, Shape
from dfuse.scheduler.predictor import Geometry, features, fit_stage, mape, predictor_from_fit, predictor_from_profiles

PROFILES = Path(__file__).resolve().parents[3] / "bench" / "profiles"
GRID = [Shape(h, w, steps=s, cfg=cfg) for h in (256, 512, 768, 1024) for w in (512, 1024) for s in (2, 8, 28)
        for cfg in (False, True)]


@pytest.mark.parametrize("stage", STAGES)
def test_fit_recovers_the_costs_within_a_few_percent_on_held_out_shapes(stage):
    rng = random.Random(3)
    geometry = Geometry(joint_text_tokens=256)
    truth = BASE[stage]

    def measure(shape):  # the true cost with 3 % multiplicative noise, like repeated timings
        return sum(c * f for c, f in zip(truth, features(stage, shape, geometry))) * math.exp(rng.gauss(0, 0.03))

    samples = [(shape, measure(shape)) for shape in GRID]
    train = [s for i, s in enumerate(samples) if i % 4]
    held_out = [s for i, s in enumerate(samples) if not i % 4]
    coefs = fit_stage(stage, train, geometry)
    assert all(c >= 0 for c in coefs)
    error = mape(stage, coefs, held_out, geometry)
    print(f"{stage}: held-out MAPE {error:.3%}")
    assert error < 0.05


def test_fit_never_returns_negative_coefficients():
    geometry = Geometry()
    # A decoder whose time does not grow with pixels (pure overhead): the slope must pin to 0, not go negative.
    samples = [(Shape(h, h), 0.5 - 1e-4 * h / 1024) for h in (256, 512, 1024, 2048)]
    coefs = fit_stage("decoder", samples, geometry)
    assert coefs[1] == 0.0 and coefs[0] == pytest.approx(0.4999, rel=0.01)


def test_streaming_and_offload_cost_models():
    predictor = make_predictor()
    shape = Shape(1024, 1024, steps=28)
    # "big" (80 GB) holds everything; on "small" (24 GB, 22.1 usable) the 22 GB DiT plus its
    # activations overflows by 0.55 GB, streamed over the 25 GB/s link on every step (overlapped).
    assert predictor.transfer_gb("dit", "big", shape, frozenset({"encoder", "decoder"})) == (0.0, 0.0)
    moved, streamed = predictor.transfer_gb("dit", "small", shape)
    assert moved == 0.0 and streamed == pytest.approx(22.0 + 0.2 + 0.1 * 4.352 - 24 * 0.92)
    fixed, per_step = predictor.compute_s("dit", "small", shape)
    assert predictor.latency("dit", "small", shape) == pytest.approx(fixed + 28 * max(per_step, streamed / 25))
    # With the encoder beside it the DiT keeps its residency; the encoder is streamed instead.
    assert predictor.transfer_gb("dit", "small", shape, frozenset({"encoder"}))[1] == pytest.approx(streamed)
    assert predictor.transfer_gb("encoder", "small", shape, frozenset({"dit"}))[1] == pytest.approx(10.0)
    # Diffusers-style offload moves the encoder whole per request, not overlapped.
    moved, streamed = predictor.transfer_gb("encoder", "small", shape, frozenset({"dit"}), offload=True)
    assert moved == pytest.approx(10.0) and streamed == 0.0
    plain = predictor.latency("encoder", "small", shape)
    assert predictor.latency("encoder", "small", shape, frozenset({"dit"}), offload=True) == pytest.approx(plain + 10.0 / 10)
    # Memory: weights + activations growing with the size feature.
    assert predictor.memory_gb("decoder", "big", Shape(2048, 2048)) > predictor.memory_gb("decoder", "big", shape)


def test_corrections_scale_latency_per_stage_and_kind():
    predictor = make_predictor()
    shape = Shape(1024, 1024, steps=28)
    corrected = predictor.corrected({("dit", "small"): 1.5})
    assert corrected.latency("dit", "small", shape) == pytest.approx(1.5 * predictor.latency("dit", "small", shape))
    assert corrected.latency("dit", "big", shape) == predictor.latency("dit", "big", shape)


def test_published_profiles_load_cite_sources_and_reproduce_their_reference_latency():
    devices = json.loads((PROFILES / "devices.json").read_text())
    for kind, d in devices["devices"].items():
        assert d["source"] and "FACTS.md" in d["source"] and isinstance(d["est"], list), kind
    for path in sorted((PROFILES / "models").glob("*.json")):
        model = json.loads(path.read_text())
        predictor = predictor_from_profiles(model, devices)
        for stage in STAGES:
            s = model["stages"][stage]
            assert s["source"] and isinstance(s["est"], list), (path.name, stage)
            assert all(predictor.knows(stage, kind) for kind in devices["devices"])
            ref = s["reference"]
            shape = Shape.from_dict(ref["shape"])
            predicted = predictor.latency(stage, ref["device"], shape)
            if stage == "dit":  # the reference is one step; the request adds its fixed cost
                predicted = (predicted - s.get("fixed_s", 0.0)) / shape.steps
            assert predicted == pytest.approx(ref["seconds"], rel=1e-6), (path.name, stage)


def test_wan_dit_on_h100_matches_the_published_252_8_s():
    devices = json.loads((PROFILES / "devices.json").read_text())
    model = json.loads((PROFILES / "models" / "wan2.1-14b.json").read_text())
    predictor = predictor_from_profiles(model, devices)
    shape = Shape(480, 832, steps=50, frames=81, cfg=True, prompt_tokens=512)
    assert predictor.latency("dit", "h100", shape) == pytest.approx(252.8 + 0.5, rel=1e-3)
    # On a 24 GB A10G the 28 GB DiT streams part of its weights every step.
    assert predictor.fits(frozenset({"dit"}), "a10g", [shape]) == "streamed"


def test_fit_document_round_trip():
    doc = {
        "geometry": {"vae_scale": 8, "patch": 2, "temporal_scale": 1, "joint_text_tokens": 0},
        "stages": {s: {"weights_gb": 0.01} for s in STAGES},
        "devices": {"cpu": {"memory_gb": 24}},
        "coefficients": {s: {"cpu": list(BASE[s])} for s in STAGES},
    }
    predictor = predictor_from_fit(doc)
    shape = Shape(256, 256, steps=4)
    assert predictor.latency("dit", "cpu", shape) == pytest.approx(sum(
        c * f for c, f in zip(BASE["dit"], features("dit", shape, Geometry(temporal_scale=1)))))

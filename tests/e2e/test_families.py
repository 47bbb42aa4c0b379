"""Flux and PixArt-Sigma: dfuse images equal diffusers' own pipeline output, pixel for pixel.

One engine per family (module-scoped, started once), tiny models, 2 steps, small images. Both
sides run torch with one thread per process (the condition for bit-identical outputs, FACTS.md).
"""

import json
import shutil

import numpy as np
import pytest
import torch

THREADS = 1
STEPS = 2

# The reference call gets exactly these arguments (plus the family's fixed ones); dfuse gets the
# same through Engine.submit. Two shapes per family, guidance on and off.
FAMILIES = {
    "flux": dict(
        model="tiny-flux",
        pipeline="FluxPipeline",
        fixed={},
        cases=[
            dict(prompt="a red fox in the snow", guidance_scale=3.5, height=64, width=64, seed=0),
            dict(prompt="a red fox in the snow", guidance_scale=1.0, height=48, width=96, seed=1),
            # True CFG: a second transformer pass with the negative prompt's embeddings.
            dict(prompt="a photo of a cat", negative_prompt="blurry", true_cfg_scale=4.0, height=64, width=64, seed=2),
            dict(prompt="a photo of a cat", negative_prompt="blurry", true_cfg_scale=1.5, guidance_scale=1.0,
                 height=48, width=96, seed=3),
            # A negative prompt without true CFG is ignored, as in diffusers.
            dict(prompt="a photo of a cat", negative_prompt="blurry", height=48, width=96, seed=4),
        ],
    ),
    "pixart": dict(
        model="tiny-pixart",
        pipeline="PixArtSigmaPipeline",
        # dfuse's PixArt stages fix these (see stages/families/pixart.py).
        fixed=dict(use_resolution_binning=False, clean_caption=False),
        cases=[
            dict(prompt="a red fox in the snow", guidance_scale=4.5, height=64, width=64, seed=0),
            dict(prompt="a red fox in the snow", guidance_scale=1.0, height=48, width=96, seed=1),
            dict(prompt="a photo of a cat", negative_prompt="blurry", guidance_scale=7.0, height=48, width=96, seed=2),
            dict(prompt="An Astronaut riding a horse", guidance_scale=1.0, height=64, width=64, seed=3),
            # A negative prompt without guidance is ignored, as in diffusers.
            dict(prompt="a photo of a cat", negative_prompt="blurry", guidance_scale=1.0, height=64, width=64, seed=4),
        ],
    ),
}
N_CASES = 5  # per family: the same count, so one parametrization covers both engines
assert all(len(spec["cases"]) == N_CASES for spec in FAMILIES.values())


class Served:
    """One family's engine and its diffusers reference."""

    def __init__(self, name):
        import diffusers

        from dfuse.engine.models.tiny import tiny_model_path

        self.name, self.spec = name, FAMILIES[name]
        self.path = tiny_model_path(self.spec["model"])
        torch.set_num_threads(THREADS)
        self.pipe = getattr(diffusers, self.spec["pipeline"]).from_pretrained(self.path)
        self.pipe.set_progress_bar_config(disable=True)
        self._cache = {}

    def reference(self, seed, num_inference_steps=STEPS, **case) -> np.ndarray:
        key = json.dumps(dict(case, seed=seed, steps=num_inference_steps), sort_keys=True)
        if key not in self._cache:
            image = self.pipe(
                **case, **self.spec["fixed"], num_inference_steps=num_inference_steps,
                generator=torch.Generator().manual_seed(seed),
            ).images[0]
            self._cache[key] = np.array(image)
        return self._cache[key]


@pytest.fixture(scope="module", params=list(FAMILIES))
def served(request):
    from dfuse import Engine

    family = Served(request.param)
    with Engine(model=str(family.path), cpu_threads=THREADS) as engine:
        family.engine = engine
        yield family


@pytest.mark.parametrize("index", range(N_CASES))
def test_image_equals_diffusers(served, index):
    case = served.spec["cases"][index]
    print(f"{served.name} case {index}: {case}")
    (image,) = served.engine.generate(num_inference_steps=STEPS, timeout=120, **case)
    assert image.size == (case["width"], case["height"])
    assert np.array_equal(np.array(image), served.reference(**case)), case


def test_the_guidance_paths_change_the_image(served):
    """Guards the cases above: each guidance mode they cover really changes the output."""
    base = dict(prompt="a photo of a cat", height=48, width=48, seed=9, num_inference_steps=STEPS)
    if served.name == "flux":
        variants = [dict(guidance_scale=3.5), dict(guidance_scale=1.0),
                    dict(guidance_scale=3.5, negative_prompt="blurry", true_cfg_scale=4.0)]
    else:
        variants = [dict(guidance_scale=4.5), dict(guidance_scale=1.0),
                    dict(guidance_scale=4.5, negative_prompt="blurry")]
    images = [np.array(served.engine.generate(**base, **v, timeout=120)[0]) for v in variants]
    for i in range(len(images)):
        for j in range(i):
            assert not np.array_equal(images[i], images[j]), (variants[i], variants[j])


def test_many_requests_in_flight_each_equal_its_reference(served):
    cases = [dict(c, seed=20 + i, num_inference_steps=2 + i % 2) for i, c in enumerate(served.spec["cases"] * 2)]
    futures = [served.engine.submit(**c) for c in cases]  # all queued before the first completes
    for case, future in zip(cases, futures):
        result = future.result(timeout=120)
        assert result.seeds == [case["seed"]]
        assert np.array_equal(np.array(result.images[0]), served.reference(**case)), case
    assert served.engine.stats().family == served.name


def test_flux_without_guidance_embedding_in_process(tmp_path):
    """A FLUX.1-schnell-like model (no guidance embedding: guidance_scale is ignored), through
    the family's three stage calls in this process: equal to FluxPipeline's own image."""
    from diffusers import FluxPipeline

    from dfuse.engine.requests import build_requests
    from dfuse.engine.models import describe_model
    from dfuse.stages.families import load_family
    from dfuse.engine.models.tiny import tiny_model_path

    path = tmp_path / "flux-schnell-like"
    shutil.copytree(tiny_model_path("tiny-flux"), path)
    config_file = path / "transformer" / "config.json"
    config = json.loads(config_file.read_text())
    config["guidance_embeds"] = False  # the guidance embedder's weights are then left unused
    config_file.write_text(json.dumps(config))

    torch.set_num_threads(THREADS)
    family, info = load_family(path), describe_model(path)
    cpu = torch.device("cpu")
    loaders = (family.load_encoder, family.load_dit, family.load_decoder)
    encoder, dit, decoder = (load(path, cpu, torch.float32) for load in loaders)
    assert dit[0].transformer.config.guidance_embeds is False
    pipe = FluxPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    for guidance in (0.0, 3.5):
        (params,) = build_requests(info, "a red fox", None, STEPS, guidance, 48, 80, 5)
        latents = family.denoise(dit, family.encode(encoder, params), params, lambda step, total: None)
        image = family.decode(decoder, latents, params)["image"][0].numpy()
        expected = pipe("a red fox", num_inference_steps=STEPS, guidance_scale=guidance, height=48, width=80,
                        generator=torch.Generator().manual_seed(5)).images[0]
        assert np.array_equal(image, np.array(expected))

"""dfuse images equal diffusers' own StableDiffusion3Pipeline output, pixel for pixel."""

import threading

import numpy as np
import pytest

CASES = [
    dict(prompt="a red fox in the snow", guidance_scale=4.5, height=128, width=128, seed=0),
    dict(prompt="a red fox in the snow", guidance_scale=1.0, height=128, width=128, seed=1),
    dict(prompt="a photo of a cat", negative_prompt="blurry", guidance_scale=7.0, height=64, width=96, seed=2),
    dict(prompt="an astronaut riding a horse", guidance_scale=1.0, height=64, width=96, seed=3),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"g{c['guidance_scale']}-{c['height']}x{c['width']}-neg{bool(c.get('negative_prompt'))}")
def test_image_equals_diffusers(engine, reference, case):
    (image,) = engine.generate(num_inference_steps=4, **case)
    assert image.size == (case["width"], case["height"])
    expected = reference(num_inference_steps=4, **case)
    assert np.array_equal(np.array(image), expected)


def test_many_requests_in_flight_each_equal_its_reference(engine, reference):
    cases = [dict(c, seed=10 + i, num_inference_steps=2 + i % 3) for i, c in enumerate(CASES * 2)]
    futures = [engine.submit(**c) for c in cases]  # all queued before the first completes
    for case, future in zip(cases, futures):
        result = future.result(timeout=120)
        assert result.seeds == [case["seed"]]
        assert np.array_equal(np.array(result.images[0]), reference(**case))


def test_generate_from_several_threads(engine, reference):
    results, errors = {}, []

    def worker(i):
        try:
            results[i] = engine.generate("a dog in the forest", num_inference_steps=2, seed=100 + i, height=64, width=64)
        except Exception as e:  # surfaced by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    for i in range(4):
        expected = reference("a dog in the forest", num_inference_steps=2, seed=100 + i, height=64, width=64)
        assert np.array_equal(np.array(results[i][0]), expected)


def test_list_of_prompts_uses_consecutive_seeds(engine, reference):
    result = engine.submit(["a cat", "a dog"], num_inference_steps=2, height=64, width=64, seed=7).result(timeout=120)
    assert result.seeds == [7, 8]
    assert set(result.timings[0]) == {"encoder", "dit", "decoder"}
    assert all(t.compute_s > 0 for t in result.timings[0].values())
    for prompt, seed, image in zip(["a cat", "a dog"], result.seeds, result.images):
        assert np.array_equal(np.array(image), reference(prompt, num_inference_steps=2, height=64, width=64, seed=seed))


def test_two_dit_workers_many_requests_each_equal_its_reference(model_path, reference):
    """1:2:1 layout: requests interleave across two DiT processes and the shared pools."""
    from dfuse import Engine

    cases = [dict(prompt=c["prompt"], guidance_scale=c["guidance_scale"], height=64, width=64,
                  num_inference_steps=2, seed=200 + i) for i, c in enumerate(CASES * 3)]
    with Engine(model=str(model_path), cpu_threads=1, instances={"encoder": 1, "dit": 2, "decoder": 1}) as engine:
        futures = [engine.submit(**c) for c in cases]
        results = [f.result(timeout=180) for f in futures]
    assert {r.timings[0]["dit"].worker_id for r in results} == {1, 2}  # both DiT workers served
    for case, result in zip(cases, results):
        assert np.array_equal(np.array(result.images[0]), reference(**case))

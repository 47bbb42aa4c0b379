"""Bad requests get a ValueError naming the field and its allowed values; the engine keeps serving."""

import math

import numpy as np
import pytest

from dfuse import Engine

BAD = [
    (dict(height=100), "height"),
    (dict(width=0), "width"),
    (dict(height=-16), "height"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(num_inference_steps=-3), "num_inference_steps"),
    (dict(guidance_scale=math.nan), "guidance_scale"),
    (dict(guidance_scale=-1.0), "guidance_scale"),
    (dict(prompt=42), "prompt"),
    (dict(prompt=[]), "prompt"),
    (dict(prompt=["ok", None]), "prompt[1]"),
    (dict(negative_prompt=["a", "b"]), "negative_prompt"),
    (dict(seed=-1), "seed"),
    (dict(num_frames=9), "num_frames"),  # an image model makes one frame
]


@pytest.mark.parametrize("bad,field", BAD, ids=[f for _, f in BAD])
def test_bad_field_is_named_and_engine_keeps_serving(engine, reference, bad, field):
    request = dict(prompt="a red fox", num_inference_steps=2, height=64, width=64, seed=5) | bad
    with pytest.raises(ValueError) as info:
        engine.generate(**request)
    assert str(info.value).startswith(field)
    (image,) = engine.generate("a red fox", num_inference_steps=2, height=64, width=64, seed=5)
    assert np.array_equal(np.array(image), reference("a red fox", num_inference_steps=2, height=64, width=64, seed=5))


def test_broken_weights_fail_start_up_with_a_clear_error(tmp_path, model_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(model_path, broken)
    for weights in (broken / "vae").glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    with pytest.raises(RuntimeError, match="decoder worker .* could not load the model"):
        Engine(model=str(broken), cpu_threads=1)


def test_a_script_without_a_main_guard_just_works(tmp_path, model_path):
    """Workers start as `python -m` of their own entry point: nothing re-imports the user's script,
    so it needs no `if __name__ == "__main__":` guard (as with diffusers)."""
    import subprocess
    import sys

    script = tmp_path / "unguarded.py"
    script.write_text("from dfuse import Engine\n"
                      f"engine = Engine(model={str(model_path)!r}, cpu_threads=1)\n"
                      "image = engine.generate('a fox', num_inference_steps=2, height=64, width=64, seed=3)[0]\n"
                      "engine.close()\n"
                      "print('size', image.size)\n")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "size (64, 64)"

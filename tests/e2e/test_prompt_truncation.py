"""A prompt longer than a text encoder reads is cut, as diffusers cuts it (the image stays
diffusers'), and the caller hears which part: in the result, as a warning of the engine's
`dfuse.engine.prompts` logger, and as a "Warning:" line of `dfuse run`."""

import logging
import subprocess
import sys

import numpy as np
import pytest

# 330 tokens for the tiny model's tokenizers: past CLIP's 77 and T5's 256.
LONG = " ".join(["a red fox in the snow at night with the moon"] * 30)
CLIP_CUT = "the prompt is longer than CLIP's 77 tokens; this part was cut (255 tokens): \"the moon a red fox in the snow"
T5_CUT = "the prompt is longer than T5's 256 tokens; this part was cut (75 tokens): \"fox in the snow at night"


@pytest.fixture
def prompt_warnings():
    """The messages the engine logs about prompts, caught on the logger itself (`dfuse run`, run
    in-process by other tests, stops it from propagating to the root logger)."""
    logger, caught = logging.getLogger("dfuse.engine.prompts"), []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: caught.append(record.getMessage())
    logger.addHandler(handler)
    yield caught
    logger.removeHandler(handler)


def test_a_long_prompt_is_cut_as_diffusers_cuts_it_and_the_caller_is_told(engine, reference, prompt_warnings):
    prompts = [LONG, "a red fox"]
    result = engine.submit(prompts, num_inference_steps=2, height=64, width=64, seed=3).result(timeout=120)
    clip, t5 = result.warnings[0]
    assert clip.startswith(CLIP_CUT) and t5.startswith(T5_CUT)
    assert result.warnings[1] == []  # a short prompt: nothing to say
    assert prompt_warnings == [clip, t5]
    for prompt, seed, image in zip(prompts, result.seeds, result.images):
        assert np.array_equal(np.array(image), reference(prompt, num_inference_steps=2, height=64, width=64, seed=seed))


def test_a_long_negative_prompt_is_named_as_such_when_guidance_reads_it(engine, prompt_warnings):
    result = engine.submit("a red fox", negative_prompt=LONG, guidance_scale=4.5, num_inference_steps=1,
                           height=64, width=64, seed=0).result(timeout=120)
    assert [w.split(";")[0] for w in result.warnings[0]] == [
        "the negative prompt is longer than CLIP's 77 tokens", "the negative prompt is longer than T5's 256 tokens"]
    unguided = engine.submit("a red fox", negative_prompt=LONG, guidance_scale=1.0, num_inference_steps=1,
                             height=64, width=64, seed=0).result(timeout=120)
    assert unguided.warnings == [[]]  # without guidance the negative prompt is not encoded at all


def test_dfuse_run_says_it_in_warning_lines(model_path, tmp_path):
    out = tmp_path / "fox.png"
    run = subprocess.run(
        [sys.executable, "-m", "dfuse.cli", "run", LONG, "--model", str(model_path), "--steps", "1", "--seed", "0",
         "--height", "64", "--width", "64", "--threads", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=180,
    )
    assert run.returncode == 0, run.stderr
    warnings = [line for line in run.stderr.splitlines() if line.startswith("Warning:")]
    assert len(warnings) == 2, run.stderr
    assert warnings[0].startswith(f"Warning: {CLIP_CUT}") and warnings[1].startswith(f"Warning: {T5_CUT}")
    assert "dfuse.engine.prompts" not in run.stderr  # said once, as the command's own line
    assert run.stdout.startswith(f"Wrote {out}")


@pytest.mark.parametrize("model, says", [
    ("tiny-flux", ["the prompt is longer than CLIP's 77 tokens", "the prompt is longer than T5's 512 tokens"]),
    ("tiny-pixart", ["the prompt is longer than T5's 300 tokens"]),
    ("tiny-wan", ["the prompt is longer than UMT5's 512 tokens"]),
])
def test_each_family_names_its_text_encoders_and_their_lengths(model, says):
    import torch

    from dfuse.engine.models.tiny import tiny_model_path
    from dfuse.engine.protocol import RequestParams
    from dfuse.stages.families import load_family

    path = tiny_model_path(model)
    family = load_family(path)
    encoder = family.load_encoder(path, torch.device("cpu"), torch.float32)
    longest = " ".join([LONG] * 3)  # 990 tokens
    warnings = family.prompt_warnings(encoder, RequestParams(longest, None, 1, 1.0, 64, 64, 0))
    assert [w.split(";")[0] for w in warnings] == says
    assert family.prompt_warnings(encoder, RequestParams("a red fox", None, 1, 1.0, 64, 64, 0)) == []

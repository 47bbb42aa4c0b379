"""build_requests: defaults, seeds per prompt, and a ValueError naming the field for bad input."""
import dataclasses
import math
import re
from collections import UserList
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dfuse.engine.requests import MAX_PROMPT_CHARS, MAX_PROMPTS, MAX_SEED, build_requests
from dfuse.engine.models.base import ModelInfo

INFO = ModelInfo(
    path=Path("/nonexistent/model"),
    family="sd3",
    pixel_multiple=16,
    default_size=128,
    max_size=1024,
    num_inference_steps=28,
    guidance_scale=7.0,
)


def _error_field(**kwargs) -> str:
    """The field a ValueError names (its first word, without an index like `[2]`)."""
    kwargs.setdefault("prompt", "a red fox")
    with pytest.raises(ValueError) as info:
        build_requests(INFO, **kwargs)
    return re.match(r"\w+", str(info.value)).group(0)


def test_defaults_follow_the_model():
    (params,) = build_requests(INFO, "a red fox in the snow", seed=5)
    assert params.prompt == "a red fox in the snow" and params.negative_prompt is None
    assert params.num_inference_steps == 28 and params.guidance_scale == 7.0
    assert params.height == params.width == 128 and params.seed == 5


def test_explicit_values_are_kept():
    (params,) = build_requests(INFO, "x", "blurry", 4, 0, 1024, 16, 0)
    assert (params.negative_prompt, params.num_inference_steps, params.height, params.width, params.seed) == (
        "blurry", 4, 1024, 16, 0
    )
    assert params.guidance_scale == 0.0 and isinstance(params.guidance_scale, float)


def test_missing_seed_is_drawn_and_reported():
    a, b = build_requests(INFO, ["x", "y"])
    assert 0 <= a.seed <= MAX_SEED and b.seed == a.seed + 1


def test_prompt_list_gets_consecutive_seeds():
    params = build_requests(INFO, ["a", "b", "c"], negative_prompt="blurry", seed=10)
    assert [p.prompt for p in params] == ["a", "b", "c"]
    assert [p.seed for p in params] == [10, 11, 12]
    assert [p.negative_prompt for p in params] == ["blurry"] * 3


def test_negative_prompt_list_pairs_with_prompts():
    params = build_requests(INFO, ("a", "b"), negative_prompt=["na", "nb"], seed=0)
    assert [(p.prompt, p.negative_prompt) for p in params] == [("a", "na"), ("b", "nb")]


@pytest.mark.parametrize("negative", [["x"], ["x", "y", "z"], ("x", "y", "z")])
def test_negative_prompt_list_length_mismatch(negative):
    assert _error_field(prompt=["a", "b"], negative_prompt=negative) == "negative_prompt"


def test_negative_prompt_sequence_length_mismatch():
    assert _error_field(prompt=["a", "b", "c"], negative_prompt=UserList(["x", "y"])) == "negative_prompt"


def test_largest_seed_for_a_list():
    params = build_requests(INFO, ["a", "b"], seed=MAX_SEED - 1)
    assert params[-1].seed == MAX_SEED
    assert _error_field(prompt=["a", "b"], seed=MAX_SEED) == "seed"  # seed + 1 would overflow int64


@pytest.mark.parametrize(
    "prompt",
    [None, 3, b"bytes", [], ["ok", 3], ["ok", None], "x" * (MAX_PROMPT_CHARS + 1), ["ok", "y" * (MAX_PROMPT_CHARS + 1)],
     ["p"] * (MAX_PROMPTS + 1), {"a": 1}],
    ids=["none", "int", "bytes", "empty_list", "list_with_int", "list_with_none", "too_long", "list_too_long",
         "too_many", "dict"],
)
def test_bad_prompt(prompt):
    assert _error_field(prompt=prompt) == "prompt"


@pytest.mark.parametrize("negative", [3, b"x", [], [None], "n" * (MAX_PROMPT_CHARS + 1)])
def test_bad_negative_prompt(negative):
    assert _error_field(negative_prompt=negative) == "negative_prompt"


def test_longest_prompt_and_most_prompts_are_accepted():
    assert build_requests(INFO, "x" * MAX_PROMPT_CHARS, seed=0)[0].prompt == "x" * MAX_PROMPT_CHARS
    assert len(build_requests(INFO, ["p"] * MAX_PROMPTS, seed=0)) == MAX_PROMPTS


@pytest.mark.parametrize("steps", [0, -1, 1.5, True, 1001, "4", 4.0])
def test_bad_steps(steps):
    assert _error_field(num_inference_steps=steps) == "num_inference_steps"


@pytest.mark.parametrize("guidance", [math.nan, math.inf, -math.inf, -1, -0.5, 100.5, "7", True, [7]])
def test_bad_guidance(guidance):
    assert _error_field(guidance_scale=guidance) == "guidance_scale"


def test_huge_integer_guidance():
    assert _error_field(guidance_scale=10**400) == "guidance_scale"


FLUX_INFO = dataclasses.replace(INFO, family="flux", guidance_scale=3.5, true_cfg=True)


def test_true_cfg_defaults_to_off_and_is_kept_for_flux():
    assert build_requests(INFO, "x", seed=0)[0].true_cfg_scale == 1.0
    (params,) = build_requests(FLUX_INFO, "x", "blurry", seed=0, true_cfg_scale=4)
    assert params.true_cfg_scale == 4.0 and type(params.true_cfg_scale) is float
    assert params.guidance_scale == 3.5  # still the embedded guidance


@pytest.mark.parametrize("value", [math.nan, math.inf, -1, 100.5, 10**400, "4", True, [4]])
def test_bad_true_cfg(value):
    with pytest.raises(ValueError, match=r"^true_cfg_scale: .*\[0, 100\]"):
        build_requests(FLUX_INFO, "x", true_cfg_scale=value)


def test_true_cfg_is_refused_by_families_without_it():
    assert build_requests(INFO, "x", seed=0, true_cfg_scale=1)[0].true_cfg_scale == 1.0  # off: harmless
    with pytest.raises(ValueError, match=r"^true_cfg_scale: the sd3 family has no true CFG"):
        build_requests(INFO, "x", "blurry", true_cfg_scale=4.0)


@pytest.mark.parametrize("field", ["height", "width"])
@pytest.mark.parametrize("size", [0, -16, 100, 1040, 16.0, True, "128", 8])
def test_bad_size(field, size):
    assert _error_field(**{field: size}) == field


@pytest.mark.parametrize("seed", [-1, 2**63, "1", 1.0, True])
def test_bad_seed(seed):
    assert _error_field(seed=seed) == "seed"


def test_sizes_at_the_bounds_are_accepted():
    (params,) = build_requests(INFO, "x", height=16, width=1024, seed=0)
    assert (params.height, params.width) == (16, 1024)


# --- property: valid input -> params in range, invalid input -> ValueError naming a bad field ----

def _mostly(valid, invalid):
    """Mostly valid draws, so that a fair share of examples has every field valid."""
    return st.integers(0, 7).flatmap(lambda k: invalid if k == 1 else valid)


_texts = st.text(max_size=12)
_odd = st.one_of(st.none(), st.booleans(), st.text(max_size=3), st.floats(allow_nan=True, allow_infinity=True))
_prompt_values = _mostly(
    st.one_of(_texts, st.lists(_texts, min_size=1, max_size=4), st.tuples(_texts, _texts)),
    st.one_of(
        st.lists(_texts, max_size=0), st.lists(st.one_of(_texts, st.integers(), st.none()), min_size=1, max_size=3),
        st.integers(), st.binary(max_size=4), st.integers(1, 3).map(lambda k: "p" * (MAX_PROMPT_CHARS + k)),
    ),
)
_negative_values = _mostly(st.one_of(st.none(), _texts), _prompt_values)  # lists: valid if the lengths match
_steps = _mostly(st.one_of(st.none(), st.integers(1, 1000)), st.one_of(st.sampled_from([0, -1, 1001]), st.integers(-3, 1003), _odd))
_guidance = _mostly(
    st.one_of(st.none(), st.floats(0, 100), st.integers(0, 100)),
    st.one_of(
        st.sampled_from([-1e-9, -1, 100.001, 101]), st.floats(-5, 105), st.floats(allow_nan=True, allow_infinity=True),
        st.integers(-(10**300), 10**300), _odd,
    ),
)
_sizes = _mostly(
    st.one_of(st.none(), st.integers(1, 64).map(lambda k: 16 * k)),
    st.one_of(st.sampled_from([0, -16, 8, 100, 1032, 1040]), st.integers(-40, 1100), _odd),
)
_seeds = _mostly(
    st.one_of(st.none(), st.integers(0, 2**40), st.integers(MAX_SEED - 5, MAX_SEED)),
    st.one_of(st.sampled_from([-1, 2**63]), st.integers(-(2**64), 2**64), st.integers(MAX_SEED - 5, MAX_SEED + 2), _odd),
)


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _prompt_list(value, allow_none):
    """The prompts `value` stands for, or None if it is invalid."""
    if value is None:
        return [None] if allow_none else None
    if isinstance(value, str):
        values = [value]
    elif isinstance(value, (list, tuple)):
        values = list(value)
        if not 1 <= len(values) <= MAX_PROMPTS:
            return None
    else:
        return None
    ok = all(isinstance(v, str) and len(v) <= MAX_PROMPT_CHARS for v in values)
    return values if ok else None


@settings(max_examples=300, database=None, deadline=None)
@given(_prompt_values, _negative_values, _steps, _guidance, _sizes, _sizes, _seeds)
def test_property_valid_or_value_error_naming_the_field(prompt, negative, steps, guidance, height, width, seed):
    prompts = _prompt_list(prompt, allow_none=False)
    negatives = _prompt_list(negative, allow_none=True)
    n = len(prompts) if prompts else 1
    bad = set()
    if prompts is None:
        bad.add("prompt")
    if negatives is None or (isinstance(negative, (list, tuple)) and prompts and len(negatives) != len(prompts)):
        bad.add("negative_prompt")
    if steps is not None and not (_is_int(steps) and 1 <= steps <= 1000):
        bad.add("num_inference_steps")
    if guidance is not None and not (
        isinstance(guidance, (int, float)) and not isinstance(guidance, bool) and math.isfinite(guidance)
        and 0 <= guidance <= 100
    ):
        bad.add("guidance_scale")
    for name, size in (("height", height), ("width", width)):
        if size is not None and not (_is_int(size) and 16 <= size <= 1024 and size % 16 == 0):
            bad.add(name)
    if seed is not None and not (_is_int(seed) and 0 <= seed <= MAX_SEED - n + 1):
        bad.add("seed")

    args = (INFO, prompt, negative, steps, guidance, height, width, seed)
    if bad:
        with pytest.raises(ValueError) as info:
            build_requests(*args)
        assert re.match(r"\w+", str(info.value)).group(0) in bad, (bad, str(info.value))
        return

    params = build_requests(*args)
    assert [p.prompt for p in params] == prompts
    expected_negatives = negatives * len(prompts) if len(negatives) == 1 else negatives
    assert [p.negative_prompt for p in params] == expected_negatives
    for i, p in enumerate(params):
        assert 1 <= p.num_inference_steps <= 1000 and p.num_inference_steps == (steps if steps is not None else 28)
        assert type(p.guidance_scale) is float and 0 <= p.guidance_scale <= 100
        assert p.guidance_scale == (guidance if guidance is not None else 7.0)
        assert p.height == (height if height is not None else 128) and p.width == (width if width is not None else 128)
        assert p.height % 16 == 0 and p.width % 16 == 0 and 16 <= min(p.height, p.width) <= max(p.height, p.width) <= 1024
        assert 0 <= p.seed <= MAX_SEED and p.seed == params[0].seed + i
        if seed is not None:
            assert p.seed == seed + i


# --- num_frames: video families take frame_step * k + 1 frames, image families one ------------

WAN_INFO = dataclasses.replace(INFO, family="wan", default_shape=(480, 832), video=True, default_frames=81,
                               frame_step=4, max_frames=1025)


def test_num_frames_defaults_follow_the_model():
    assert build_requests(INFO, "x", seed=0)[0].num_frames == 1
    (params,) = build_requests(WAN_INFO, "x", seed=0)
    assert params.num_frames == 81 and (params.height, params.width) == (480, 832)
    assert [build_requests(WAN_INFO, "x", seed=0, num_frames=n)[0].num_frames for n in (1, 5, 9, 1025)] == [1, 5, 9, 1025]


@pytest.mark.parametrize("frames", [0, -3, 2, 4, 10, 80, 1029, 9.0, "9", True, [9]])
def test_bad_num_frames_name_the_field_and_the_allowed_values(frames):
    with pytest.raises(ValueError, match=r"^num_frames: must be .*4k\+1 in \[1, 1025\]") as info:
        build_requests(WAN_INFO, "x", num_frames=frames)
    assert "default 81" in str(info.value)


@pytest.mark.parametrize("frames", [2, 5, 9, 81, 0, 1.0, "1", True])
def test_image_families_refuse_more_than_one_frame(frames):
    with pytest.raises(ValueError, match=r"^num_frames: the sd3 family makes images, not videos; leave num_frames unset or 1"):
        build_requests(INFO, "x", num_frames=frames)


def test_image_families_accept_one_frame():
    assert build_requests(INFO, "x", seed=0, num_frames=1)[0].num_frames == 1

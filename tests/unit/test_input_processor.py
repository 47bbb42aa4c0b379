"""The one input processor (engine/input_processor.py) that Engine.submit and `dfuse run` share:
fields, memory admission once budgets are known, transport slots, and what a request carries."""

import itertools

import pytest

from dfuse.engine.config import BatchConfig, EngineConfig, TransportConfig
from dfuse.engine.input_processor import InputProcessor
from dfuse.engine.models import describe_model, detect_family
from dfuse.engine.models.tiny import tiny_model_path

GIB = 2**30


@pytest.fixture(scope="module")
def model():
    path = tiny_model_path("tiny-sd3")
    return describe_model(path), detect_family(path)


def processor(model, **config) -> InputProcessor:
    info, family = model
    return InputProcessor.for_config(EngineConfig(**config), info, family)


def test_memory_admission_applies_once_budgets_are_measured(model):
    inputs = processor(model)
    (big,) = inputs.params("a fox", height=1024, width=1024, seed=0)  # before the workers measured memory
    assert not big.vae_tiling
    inputs.budgets = {"encoder": GIB, "dit": GIB, "decoder": GIB // 4}
    (tiled,) = inputs.params("a fox", height=1024, width=1024, seed=0)
    assert tiled.vae_tiling  # a full decode does not fit a quarter GiB; a tiled one does
    inputs.budgets = {"encoder": GIB, "dit": 1, "decoder": GIB}
    with pytest.raises(ValueError, match="^height/width: .*dit stage"):
        inputs.params("a fox", height=1024, width=1024, seed=0)


def test_outputs_that_overflow_a_slot_are_refused_naming_the_size(model):
    inputs = processor(model, transport=TransportConfig(slot_mib=1))
    with pytest.raises(ValueError, match="^height/width: .*--slot-mib"):
        inputs.params("a fox", height=1024, width=1024, seed=0)


def test_requests_carry_ids_seeds_deadline_and_batch_profiles(model):
    inputs = processor(model, batching=BatchConfig(enabled=True))
    requests = inputs.requests(itertools.count(7), ["a", "b"], seed=3, priority=2, timeout=30)
    assert [(r.id, r.params.seed, r.priority) for r in requests] == [(7, 3, 2), (8, 4, 2)]
    assert all(r.deadline is not None and set(r.profiles) == {"encoder", "dit", "decoder"} for r in requests)
    for bad, field in [({"priority": 10**9}, "priority"), ({"timeout": -1}, "timeout"),
                       ({"on_progress": 3}, "on_progress"), ({"num_inference_steps": 0}, "num_inference_steps")]:
        with pytest.raises(ValueError, match=f"^{field}: "):
            inputs.requests(itertools.count(), "a", **bad)

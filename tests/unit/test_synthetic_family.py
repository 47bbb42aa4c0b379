"""The synthetic family that benchmarks the engine: spec parsing, cost scaling, bottleneck math."""

import pytest

from dfuse.bench.pipeline import bottleneck, parse_layout
from dfuse.engine.protocol import RequestParams
from dfuse.engine.models import describe_model, detect_family
from dfuse.engine.models.synthetic import SyntheticSpec, parse_spec
from dfuse.stages.families.synthetic import SyntheticFamily


def test_spec_parses_costs_and_mode():
    costs, mode = parse_spec("synthetic:encoder=20ms,dit=0.1s,decoder=60ms,mode=burn")
    assert costs == {"encoder": 0.02, "dit": 0.1, "decoder": 0.06} and mode == "burn"


@pytest.mark.parametrize("spec", ["synthetic:dit=fast", "synthetic:gpu=10ms", "synthetic:mode=spin", "synthetic:dit=-1ms"])
def test_bad_spec_names_the_model_field(spec):
    with pytest.raises(ValueError, match="^model: bad synthetic spec"):
        parse_spec(spec)


def test_synthetic_model_is_detected_without_a_folder():
    family = detect_family("synthetic:dit=10ms")
    assert isinstance(family, SyntheticSpec)
    assert describe_model("synthetic:dit=10ms").pixel_multiple == 16


def test_costs_scale_like_real_stages():
    family = SyntheticFamily("synthetic:encoder=10ms,dit=100ms,decoder=50ms")
    nominal = RequestParams("p", None, 4, 1.0, 64, 64, 0)
    bigger = RequestParams("p", None, 8, 1.0, 128, 128, 0)  # 2x steps, 4x pixels
    assert family.cost("encoder", bigger) == pytest.approx(family.cost("encoder", nominal))
    assert family.cost("dit", bigger) == pytest.approx(8 * family.cost("dit", nominal))
    assert family.cost("decoder", bigger) == pytest.approx(4 * family.cost("decoder", nominal))


def test_bottleneck_is_the_stage_with_least_capacity():
    costs = {"encoder": 0.02, "dit": 0.1, "decoder": 0.06}
    assert bottleneck(costs, parse_layout("1:1:1")) == ("dit", pytest.approx(10.0))
    assert bottleneck(costs, parse_layout("1:2:1")) == ("decoder", pytest.approx(1 / 0.06))
    with pytest.raises(ValueError, match="--layouts"):
        parse_layout("1:0:1")

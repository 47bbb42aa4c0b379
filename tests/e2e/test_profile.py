"""`dfuse profile` on the tiny model (in this process, a few shapes): the profile it writes loads
into the predictor and predicts every stage. Speed is not asserted; the fit's quality is reported
by the command itself (held-out MAPE), see bench/profiles/tiny-sd3-cpu.json."""

import json

from click.testing import CliRunner

from dfuse.bench.profile import profile
from dfuse.scheduler.core import STAGES, Shape
from dfuse.scheduler.predictor import predictor_from_fit


def test_profile_measures_the_real_stages_and_fits_the_predictor(tmp_path):
    out = tmp_path / "profile.json"
    result = CliRunner().invoke(profile, ["--grid", "smoke", "--repeats", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "MAPE held-out" in result.output
    doc = json.loads(out.read_text())
    assert {s["stage"] for s in doc["samples"]} == set(STAGES)
    assert all(s["seconds"] > 0 for s in doc["samples"])
    assert doc["geometry"]["joint_text_tokens"] > 0  # read from the real encoder's output
    for stage in STAGES:
        assert doc["fit"][stage]["held_out"] >= 1
        assert doc["stages"][stage]["weights_gb"] > 0
    predictor = predictor_from_fit(doc)
    shape = Shape(256, 256, steps=4, cfg=True)
    assert all(predictor.latency(s, doc["device_kind"], shape) > 0 for s in STAGES)

"""`dfuse models list` and `dfuse models inspect`: what a newcomer reads before serving a model."""

import json
import shutil

from click.testing import CliRunner

from dfuse.cli import main
from dfuse.engine.models.tiny import tiny_model_path


def test_inspect_tells_family_components_weights_and_memory():
    run = CliRunner().invoke(main, ["models", "inspect", "tiny-sd3", "--json"])
    assert run.exit_code == 0, run.output
    doc = json.loads(run.output)
    assert (doc["family"], doc["pipeline"]) == ("sd3", "StableDiffusion3Pipeline")
    assert doc["components"]["transformer"] == "SD3Transformer2DModel"
    assert doc["defaults"]["height"] == doc["defaults"]["width"] == 128
    for stage in ("encoder", "dit", "decoder"):
        assert doc["stages"][stage]["weights_gb"] > 0
    decoder = doc["stages"]["decoder"]
    assert decoder["slot_mib_needed"] == round(128 * 128 * 3 / 2**20, 2)  # one 128x128 RGB uint8 image
    assert decoder["activations_gb"]["float32"] > decoder["activations_gb"]["bfloat16"] > 0
    text = CliRunner().invoke(main, ["models", "inspect", "tiny-sd3"]).output
    assert "defaults: 128x128, 28 steps" in text and "decoder" in text


def test_inspect_of_something_that_is_no_model_names_the_argument(tmp_path):
    run = CliRunner().invoke(main, ["models", "inspect", str(tmp_path)])
    assert run.exit_code == 2 and "MODEL: " in run.output and "model_index.json" in run.output


def test_list_shows_the_tiny_models_and_the_hub_cache(tmp_path, monkeypatch):
    snapshots = tmp_path / "hub" / "models--acme--tiny-sd3-copy" / "snapshots"
    shutil.copytree(tiny_model_path("tiny-sd3"), snapshots / "0123abc")
    (snapshots.parent.parent / "models--acme--kandinsky" / "snapshots" / "9").mkdir(parents=True)
    (snapshots.parent.parent / "models--acme--kandinsky" / "snapshots" / "9" / "model_index.json").write_text(
        '{"_class_name": "KandinskyPipeline"}')
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    run = CliRunner().invoke(main, ["models", "list"])
    assert run.exit_code == 0, run.output
    rows = {line.split()[0]: line.split()[1] for line in run.output.splitlines() if not line.startswith("(")}
    assert rows["tiny-sd3"] == "sd3" and rows["tiny-wan"] == "wan"
    assert rows["acme/tiny-sd3-copy"] == "sd3"
    assert rows["acme/kandinsky"] == "not"  # "not served (pipeline 'KandinskyPipeline' is not supported)"
    assert "KandinskyPipeline" in run.output

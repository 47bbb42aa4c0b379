"""Engine(...) refuses a bad model, policy or temp dir with a ValueError naming what to fix,
before any process starts (moved from tests/e2e: nothing here spawns a worker or loads weights)."""

import pytest

from dfuse import Engine
from dfuse.engine.elastic import ElasticConfig
from dfuse.engine.models.tiny import tiny_model_path

SYNTHETIC = "synthetic:encoder=5ms,dit=40ms,decoder=30ms"


def test_missing_model_path_is_refused_before_any_process(tmp_path):
    with pytest.raises(ValueError, match="^model: .*neither a built-in model"):
        Engine(model=str(tmp_path / "nope"))


def test_folder_that_is_not_an_sd3_model_is_refused(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "KandinskyPipeline"}')
    with pytest.raises(ValueError, match="^model: .*StableDiffusion3Pipeline"):
        Engine(model=str(tmp_path))


def test_unknown_policy_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="^policy: must be one of static, elastic"):
        Engine(model=SYNTHETIC, policy="greedy")


@pytest.mark.parametrize("field, value, message", [
    ("interval_s", 0, "elastic.interval_s: must be a number of seconds > 0"),
    ("min_gain", -1, r"elastic.min_gain: must be a number in \[0, 10\)"),
    ("min_arrivals", 0, r"elastic.min_arrivals: must be an integer in \[1, 100000\]"),
])
def test_bad_elastic_settings_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        ElasticConfig(**{field: value})


def test_a_temp_dir_too_long_for_socket_paths_is_a_clear_error(monkeypatch, tmp_path):
    import tempfile

    model_path = tiny_model_path("tiny-sd3")
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    with pytest.raises(ValueError, match=r"TMPDIR: the engine's socket directory .* has \d+ characters, and at "
                                         r"most 91 leave room for its Unix sockets' names; set TMPDIR"):
        Engine(model=str(model_path), cpu_threads=1)
    assert list(deep.iterdir()) == []

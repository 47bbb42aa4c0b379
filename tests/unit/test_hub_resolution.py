"""--model as a Hugging Face repo id, offline (as CI is): resolved from the HF cache, and where it
cannot be, one line that says why and what to do, before any worker starts. Weight files that
are missing are named as the .safetensors they should be (diffusers names the .bin fallback)."""

import pytest
from click.testing import CliRunner

from dfuse.cli import main
from dfuse.engine.models import resolve_model_path
from dfuse.engine.models.tiny import tiny_model_path
from hub_cache import add_repo


@pytest.fixture
def hub(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def test_a_cached_repo_id_resolves_to_its_snapshot(hub):
    snapshot = add_repo(hub, "acme/tiny-sd3", tiny_model_path("tiny-sd3"))
    assert resolve_model_path("acme/tiny-sd3") == snapshot.resolve()


def test_a_repo_that_is_not_cached_gets_one_line_saying_how_to_get_it(hub):
    run = CliRunner().invoke(main, ["run", "a fox", "--model", "acme/missing"])
    assert run.exit_code == 2, run.output
    (error,) = [line for line in run.output.splitlines() if line.startswith("Error:")]
    assert "'acme/missing' is not in the Hugging Face cache" in error and "HF_HUB_OFFLINE is set" in error
    assert "`hf download acme/missing`" in error and "local diffusers folder" in error
    assert "Traceback" not in run.output


def test_an_unknown_revision_is_named(hub):
    add_repo(hub, "acme/tiny-sd3", tiny_model_path("tiny-sd3"))
    with pytest.raises(ValueError, match=r"'acme/tiny-sd3' at revision 'v9' is not in the Hugging Face cache.*"
                                         r"hf download acme/tiny-sd3 --revision v9"):
        resolve_model_path("acme/tiny-sd3", revision="v9")


def test_neither_folder_name_nor_repo_id_says_what_model_may_be(hub):
    with pytest.raises(ValueError, match=r"neither a built-in model .* an existing folder, nor a Hugging Face repo id"):
        resolve_model_path("./no/such/folder")


def test_a_missing_safetensors_file_is_named_as_such(tmp_path):
    folder = tmp_path / "sd3"
    add_repo(tmp_path, "acme/x", tiny_model_path("tiny-sd3")).rename(folder)
    (folder / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    run = CliRunner().invoke(main, ["run", "a fox", "--model", str(folder)])
    assert run.exit_code == 2, run.output
    assert (f"--model: '{folder / 'transformer'}' holds no weights: expected diffusion_pytorch_model.safetensors"
            in run.output), run.output
    assert ".bin" not in run.output


def test_variant_files_need_the_variant_and_the_variant_needs_its_files(hub):
    fp16 = add_repo(hub, "acme/tiny-sd3-fp16", tiny_model_path("tiny-sd3"), variant="fp16")
    add_repo(hub, "acme/tiny-sd3", tiny_model_path("tiny-sd3"))
    assert resolve_model_path("acme/tiny-sd3-fp16", variant="fp16") == fp16.resolve()
    with pytest.raises(ValueError, match=r"text_encoder' holds no weights \(it has model.fp16.safetensors\).*"
                                         r"--variant fp16 loads the files it has"):
        resolve_model_path("acme/tiny-sd3-fp16")
    with pytest.raises(ValueError, match=r"holds no fp16 weights \(it has model.safetensors\): expected "
                                         r"model.fp16.safetensors"):
        resolve_model_path("acme/tiny-sd3", variant="fp16")

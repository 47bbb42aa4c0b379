"""`dfuse run` refuses bad options before any worker starts, naming the flag, and never leaves a
half-written --out behind."""

from importlib.metadata import version

import click
import pytest
from click.testing import CliRunner

from dfuse.cli import _ignored_flags, _write_atomically, main
from dfuse.engine.models import describe_model
from dfuse.engine.models.tiny import tiny_model_path
from dfuse.engine.protocol import RequestParams


@pytest.mark.parametrize("args, flag, detail", [
    (["--threads", "0"], "--threads", "[1, 1024]"),
    (["--instances", "dit=0"], "--instances (instances.dit)", "[1, 64]"),
    (["--instances", "vae=1"], "--instances", "stages encoder, dit, decoder"),
    (["--device", "tpu"], "--device: must be", "'cpu', 'cuda' or 'cuda:N'"),  # one device: no stage named
    (["--device", "encoder=tpu"], "--device (encoder)", "'cpu', 'cuda' or 'cuda:N'"),
    (["--device", "encoder=cpu,vae=cpu"], "--device", "unknown stage(s) ['vae']"),
    (["--steps", "0"], "--steps", "[1, 1000]"),
    (["--out", "/proc/no-such-dir/out.png"], "--out", "cannot write in /proc/no-such-dir"),
    (["--out", "out.mp4"], "--out", "must end in one of .png"),
    (["--fps", "24"], "--fps", "the sd3 model makes images"),
    (["--model", "tiny-flux", "--true-cfg-scale", "4"], "--true-cfg-scale", "needs --negative-prompt"),
    (["-q", "-v"], "-q/--quiet and -v/--verbose", "not both"),
    (["-q", "--log-level", "debug"], "-q/--quiet and --log-level debug", "errors only"),
    (["--dtype", "float64"], "Invalid value for '--dtype'", "'auto', 'float32', 'float16', 'bfloat16'"),
    (["--log-level", "trace"], "Invalid value for '--log-level'", "'debug', 'info', 'warning', 'error'"),
])
def test_bad_options_are_refused_naming_the_flag(args, flag, detail):
    result = CliRunner().invoke(main, ["run", "a fox", *args])
    assert result.exit_code == 2, result.output
    assert f"Error: {flag}" in result.output and detail in result.output
    assert "Traceback" not in result.output


def test_version_prints_the_installed_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and result.output == f"dfuse {version('dfuse')}\n"


@pytest.mark.parametrize("prompt, detail", [
    ("a \udcff fox", "must be valid Unicode text"),  # what Python makes of a non-UTF-8 byte in argv
    ("x" * 10_001, "at most 10000 characters"),
])
def test_a_bad_prompt_is_named_PROMPT(prompt, detail):
    result = CliRunner().invoke(main, ["run", prompt])
    assert result.exit_code == 2, result.output
    assert f"Error: PROMPT: {detail}" in result.output and "prompt[0]" not in result.output


def _params(negative, guidance, true_cfg=1.0):
    return RequestParams("a fox", negative, 2, guidance, 64, 64, 0, true_cfg_scale=true_cfg)


def test_a_negative_prompt_without_guidance_gets_one_warning():
    sd3 = describe_model(tiny_model_path())
    (warning,) = _ignored_flags(sd3, _params("blurry", 1.0))
    assert warning == ("--negative-prompt has no effect without guidance: --guidance-scale is 1 "
                       "(guidance is on when > 1)")
    assert _ignored_flags(sd3, _params("blurry", 7.0)) == []
    assert _ignored_flags(sd3, _params(None, 1.0)) == []


def test_flux_reads_a_negative_prompt_only_with_true_cfg():
    flux = describe_model(tiny_model_path("tiny-flux"))
    (warning,) = _ignored_flags(flux, _params("blurry", 3.5))  # embedded guidance: no negative pass
    assert "no effect without guidance" in warning and "--true-cfg-scale > 1" in warning
    assert _ignored_flags(flux, _params("blurry", 1.0, true_cfg=4.0)) == []


def test_a_writer_that_fails_leaves_no_file_at_out(tmp_path):
    out = tmp_path / "clip.mp4"

    def fail(path):
        open(path, "wb").write(b"\x00" * 10)  # half a file, then the encoder dies
        raise OSError("ffmpeg exited with 1")

    with pytest.raises(click.ClickException, match="--out: could not write .*ffmpeg exited with 1"):
        _write_atomically(out, fail)
    assert list(tmp_path.iterdir()) == []


def test_a_writer_that_writes_nothing_without_raising_is_an_error(tmp_path):
    out = tmp_path / "clip.mp4"
    with pytest.raises(click.ClickException, match="produced no data"):
        _write_atomically(out, lambda path: None)
    assert list(tmp_path.iterdir()) == []


def test_a_good_write_replaces_out_whole(tmp_path):
    out = tmp_path / "image.png"
    out.write_bytes(b"old")
    _write_atomically(out, lambda path: open(path, "wb").write(b"new image"))
    assert out.read_bytes() == b"new image" and list(tmp_path.iterdir()) == [out]

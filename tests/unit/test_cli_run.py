"""`dfuse run` refuses bad options before any worker starts, naming the flag, and never leaves a
half-written --out behind."""

import click
import pytest
from click.testing import CliRunner

from dfuse.cli import _write_atomically, main


@pytest.mark.parametrize("args, flag, detail", [
    (["--threads", "0"], "--threads", "[1, 1024]"),
    (["--instances", "dit=0"], "--instances (instances.dit)", "[1, 64]"),
    (["--instances", "vae=1"], "--instances", "stages encoder, dit, decoder"),
    (["--device", "tpu"], "--device (encoder)", "'cpu', 'cuda' or 'cuda:N'"),
    (["--device", "encoder=cpu,vae=cpu"], "--device", "unknown stage(s) ['vae']"),
    (["--steps", "0"], "--steps", "[1, 1000]"),
    (["--out", "/proc/no-such-dir/out.png"], "--out", "cannot write in /proc/no-such-dir"),
    (["--out", "out.mp4"], "--out", "must end in one of .png"),
    (["--fps", "24"], "--fps", "the sd3 model makes images"),
    (["--model", "tiny-flux", "--true-cfg-scale", "4"], "--true-cfg-scale", "needs --negative-prompt"),
])
def test_bad_options_are_refused_naming_the_flag(args, flag, detail):
    result = CliRunner().invoke(main, ["run", "a fox", *args])
    assert result.exit_code == 2, result.output
    assert f"Error: {flag}" in result.output and detail in result.output
    assert "Traceback" not in result.output


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

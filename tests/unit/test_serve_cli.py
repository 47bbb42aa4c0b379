"""`dfuse serve`'s refusals before anything starts."""

from click.testing import CliRunner

from dfuse.cli import main


def test_serving_beyond_loopback_without_a_key_is_refused():
    result = CliRunner().invoke(main, ["serve", "--host", "0.0.0.0"], env={"DFUSE_API_KEY": ""})
    assert result.exit_code == 2 and "--api-key" in result.output and "--insecure-no-api-key" in result.output


def test_a_bad_model_is_refused_before_the_port_opens():
    result = CliRunner().invoke(main, ["serve", "--model", "/no/such/folder", "--port", "1"])
    assert result.exit_code == 2 and "--model" in result.output

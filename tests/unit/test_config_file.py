"""`--config FILE`: the file's values reach the engine config of `dfuse run` and `dfuse serve`,
flags on the command line win over them, and a bad file is a usage error naming the file and the
key before anything starts. No worker starts here: the engine and the server are stand-ins that
record what the command built."""

import os

import pytest
from click.testing import CliRunner

import dfuse.engine.engine
import dfuse.serve.server
from dfuse.cli import main

SYNTHETIC = "synthetic:encoder=1ms,dit=1ms,decoder=1ms"
two_cores = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two usable CPUs")


class _NoWorkers:
    """Stands in for Engine: records the config and the request `dfuse run` made, starts nothing
    (its submit interrupts the run: exit 130)."""

    seen: dict = {}

    def __init__(self, config):
        self.seen["config"] = config

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def submit(self, prompt, **params):
        self.seen["params"] = params
        raise KeyboardInterrupt


@pytest.fixture
def built(monkeypatch):
    """What the commands built: {"config": EngineConfig, "params": run's request, "serve": serve's args}."""
    seen = {}
    monkeypatch.setattr(_NoWorkers, "seen", seen)
    monkeypatch.setattr(dfuse.engine.engine, "Engine", _NoWorkers)

    def fake_serve(config, settings, host, port, grace_s, log_level):
        seen.update(config=config, serve=dict(settings=settings, host=host, port=port, grace_s=grace_s,
                                              log_level=log_level))
        return 0

    monkeypatch.setattr(dfuse.serve.server, "serve", fake_serve)
    return seen


def _invoke(tmp_path, toml: str, *args: str):
    path = tmp_path / "dfuse.toml"
    path.write_text(toml)
    return CliRunner().invoke(main, [*args, "--config", str(path)], env={"DFUSE_API_KEY": ""})


def _run(tmp_path, toml: str, *flags: str):
    return _invoke(tmp_path, toml, "run", "a fox", "--out", str(tmp_path / "fox.png"), *flags)


@two_cores
def test_the_files_values_reach_dfuse_runs_engine_config(tmp_path, built):
    result = _run(tmp_path, f'''
        model = "{SYNTHETIC}"
        devices = "cpu:0,cpu:1"
        placement = "cpu:0=encoder+decoder,cpu:1=dit"
        policy = "elastic"
        dtype = "bfloat16"
        threads = 1
        slot-mib = 32              # the flag's spelling works too
        batching = true
        memory_limit_gib = 2       # one number: each memory of the engine's devices
        max_attempts = 5

        [run]
        steps = 3
        seed = 7
        ''')
    assert result.exit_code == 130, result.output  # the stand-in engine interrupts the run
    config = built["config"]
    assert config.model == SYNTHETIC and config.devices == ("cpu:0", "cpu:1")
    assert config.layout() == {"cpu:0": ["encoder", "decoder"], "cpu:1": ["dit"]}
    assert (config.policy, config.dtype, config.cpu_threads, config.transport.slot_mib) == ("elastic", "bfloat16", 1, 32)
    assert config.batching.enabled and dict(config.memory_limit_gib) == {"cpu": 2} and config.max_attempts == 5
    assert built["params"]["num_inference_steps"] == 3 and built["params"]["seed"] == 7


def test_without_a_file_the_engine_defaults_stay(tmp_path, built):
    result = CliRunner().invoke(main, ["run", "a fox", "--model", SYNTHETIC, "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 130, result.output
    config = built["config"]
    assert not config.batching.enabled and dict(config.memory_limit_gib) == {} and config.max_attempts == 3
    assert config.transport.slot_mib == 16 and config.cpu_threads is None


def test_flags_on_the_command_line_win_over_the_file(tmp_path, built):
    result = _run(tmp_path, f'''
        model = "{SYNTHETIC}"
        threads = 2
        dtype = "float16"
        batching = true
        memory_limit_gib = "cpu=4"
        [run]
        steps = 3
        ''', "--threads", "1", "--no-batching", "--memory-limit-gib", "0.5", "--steps", "2")
    assert result.exit_code == 130, result.output
    config = built["config"]
    assert config.cpu_threads == 1 and not config.batching.enabled and dict(config.memory_limit_gib) == {"cpu": 0.5}
    assert config.dtype == "float16"  # not given on the command line: the file's
    assert built["params"]["num_inference_steps"] == 2


def test_a_placement_in_the_file_yields_to_device_flags(tmp_path, built):
    result = _run(tmp_path, f'''
        model = "{SYNTHETIC}"
        devices = "cpu:0,cpu:1"
        placement = "cpu:0=encoder+decoder,cpu:1=dit"
        ''', "--device", "cpu", "--instances", "dit=2")
    assert result.exit_code == 130, result.output
    assert built["config"].placement is None and dict(built["config"].instances) == {"encoder": 1, "dit": 2, "decoder": 1}


def test_verbose_on_the_command_line_wins_over_quiet_in_the_file(tmp_path, built):
    result = _run(tmp_path, f'model = "{SYNTHETIC}"\nquiet = true\n', "-v", "--negative-prompt", "blurry",
                  "--guidance-scale", "1")
    assert result.exit_code == 130, result.output
    assert "Warning: --negative-prompt has no effect" in result.output  # what -q would have hidden


def test_serve_reads_its_table_and_the_shared_keys(tmp_path, built):
    result = _invoke(tmp_path, f'''
        model = "{SYNTHETIC}"
        port = 9000
        max_attempts = 4
        [serve]
        port = 9001                # the command's own table wins over the shared key
        served-model-name = "fox"
        api_key = "secret"
        max_queue = 8
        grace_period = 2.5
        ''', "serve", "--max-queue", "16")
    assert result.exit_code == 0, result.output
    serve = built["serve"]
    assert (serve["host"], serve["port"], serve["grace_s"]) == ("127.0.0.1", 9001, 2.5)
    settings = serve["settings"]
    assert (settings.model_name, settings.api_key, settings.max_queue) == ("fox", "secret", 16)
    assert built["config"].model == SYNTHETIC and built["config"].max_attempts == 4


def test_dfuse_run_skips_the_keys_only_serve_has(tmp_path, built):
    result = _run(tmp_path, f'model = "{SYNTHETIC}"\nport = 9000\nhost = "0.0.0.0"\n[serve]\nmax_queue = 8\n')
    assert result.exit_code == 130, result.output


@pytest.mark.parametrize("toml, says", [
    ('modle = "tiny-sd3"', "modle: unknown key; did you mean model? the keys are the long flag names of dfuse run or dfuse serve:"),
    ('[serve]\nsteps = 4', "[serve] steps: not an option of dfuse serve, only of dfuse run"),
    ('[serve]\nprot = 4', "[serve] prot: unknown key; did you mean port? the keys are the long flag names of dfuse serve:"),
    ('[run]\nport = 80', "[run] port: not an option of dfuse run, only of dfuse serve"),
    ('[run]\nmodle = "x"', "[run] modle: unknown key; did you mean model? the keys are the long flag names of dfuse run:"),
    ('threads = "4"', 'threads: expected an integer (as --threads takes), got "4"'),
    ("threads = true", "threads: expected an integer (as --threads takes), got true"),
    ("model = 3", "model: expected a string (as --model takes), got 3"),
    ('batching = "yes"', 'batching: expected true or false (as --batching takes), got "yes"'),
    ("port = 80.5", "port: expected an integer (as --port takes), got 80.5"),
    ("port = 70000", "port: 70000 is not in the range 0<=x<=65535"),
    ('dtype = "float64"', "dtype: 'float64' is not one of 'auto', 'float32', 'float16', 'bfloat16'"),
    ("memory_limit_gib = true", "memory_limit_gib: expected a number or a string of device=GiB pairs"),
    ('memory_limit_gib = "cpu=lots"', "memory_limit_gib: expected GiB as one number (8) or device=GiB pairs"),
    ('[placement]\n"cpu:0" = "dit"', "[placement]: unknown table; the tables are [run] and [serve]"),
    ("slot_mib = 8\nslot-mib = 16", "slot-mib: given twice (as slot_mib and slot-mib)"),
    ("model = ", "not valid TOML: Invalid value (at end of document)"),
])
def test_a_bad_file_is_a_usage_error_naming_the_file_and_the_key(tmp_path, built, toml, says):
    result = _run(tmp_path, toml)
    assert result.exit_code == 2, result.output
    assert f"Error: {tmp_path / 'dfuse.toml'}: {says}" in result.output
    assert "Traceback" not in result.output and "config" not in built  # refused before anything started


@pytest.mark.parametrize("toml, flags, says", [
    ("threads = 0", [], "Error: --threads (cpu_threads; set in {file}): must be an integer in [1, 1024] (got 0)"),
    ('[run]\nsteps = 0', [], "Error: --steps (num_inference_steps; set in {file}): must be in [1, 1000]"),
    ('instances = "dit=0"', [], "Error: --instances (instances.dit; set in {file}): must be an integer in [1, 64]"),
    ('memory_limit_gib = "cuda:0=8"', [], "Error: --memory-limit-gib (set in {file}): 'cuda:0' is "
                                           "not a device of this engine"),
    ('log_level = "debug"\nquiet = true', [], "Error: -q/--quiet and --log-level debug (set in {file}): -q shows errors only"),
    ("threads = 2", ["--threads", "0"], "Error: --threads (cpu_threads): must be an integer in [1, 1024] (got 0)"),
])
def test_a_value_the_engine_refuses_names_the_file_when_it_came_from_there(tmp_path, built, toml, flags, says):
    result = _run(tmp_path, f'model = "{SYNTHETIC}"\n{toml}', *flags)
    assert result.exit_code == 2, result.output
    assert says.format(file=tmp_path / "dfuse.toml") in result.output
    assert "config" not in built


def test_serve_refuses_a_public_host_from_the_file_without_a_key(tmp_path, built):
    result = _invoke(tmp_path, 'host = "0.0.0.0"', "serve")
    assert result.exit_code == 2, result.output
    assert f"Error: --host (set in {tmp_path / 'dfuse.toml'}): 0.0.0.0 is reachable beyond this machine" in result.output
    assert "config" not in built


def test_a_missing_file_is_named(tmp_path):
    result = CliRunner().invoke(main, ["run", "a fox", "--config", str(tmp_path / "nope.toml")])
    assert result.exit_code == 2 and "--config" in result.output and "nope.toml" in result.output

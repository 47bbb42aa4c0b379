"""`dfuse` command line: run a generation, build the tiny models, run benchmarks."""

from __future__ import annotations

import logging
import os
import re
import secrets
import sys
import tempfile
import threading
import time
from pathlib import Path

import click
from click.core import ParameterSource

from .config_file import read_config
from .engine.config import DEFAULT_MODEL, EngineConfig, parse_devices, parse_instances, parse_memory_limits
from .engine.devices import FUSED_ALIAS, parse_device_list, parse_placement
from .engine.models import describe_model, resolve_model_path
from .engine.models.libraries import quiet_libraries
from .scheduler.core import FUSED, STAGES

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".gif")  # mp4: H.264 through imageio-ffmpeg; gif: PIL (256 colours)
LOG_LEVELS = ("debug", "info", "warning", "error")


class _Commands(click.Group):
    def invoke(self, ctx):
        from .engine.models.tiny import UntrustedCacheError

        try:
            return super().invoke(ctx)
        except UntrustedCacheError as e:  # says which folder and what to do: no traceback
            raise click.ClickException(str(e)) from None


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dfuse", prog_name="dfuse", message="%(prog)s %(version)s")
def main():
    """dfuse: serve diffusion models as disaggregated stages (encoder, DiT, decoder)."""
    # tqdm's default lock is a multiprocessing semaphore that the spawn resource tracker then
    # reports as leaked at exit; our bars are only updated from threads of this process.
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())


def _engine_options(command):
    """The options that make an EngineConfig, the same for `dfuse run` and `dfuse serve`."""
    options = [
        click.option("--config", type=click.Path(exists=True, dir_okay=False, path_type=Path), is_eager=True,
                     expose_value=False, callback=_read_config_file,
                     help="A TOML file of option values (keys: the long flag names; [run] and [serve] tables for "
                          "one command); flags given here win over it."),
        click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Built-in tiny model (tiny-sd3, tiny-flux, tiny-pixart, tiny-wan), a local diffusers SD3, Flux, PixArt-Sigma or Wan2.1 folder, or a Hugging Face repo id (downloaded into the HF cache; HF_HUB_OFFLINE=1 uses the cache only)."),
        click.option("--revision", default=None, help="Hub revision of a repo id --model: branch, tag or commit [default: main]."),
        click.option("--variant", default=None, help="Weight files to load, as diffusers' variant: fp16 loads *.fp16.safetensors [default: the plain ones]."),
        click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N, or per stage: encoder=cpu,dit=cuda:0,decoder=cuda:0."),
        click.option("--instances", default="encoder=1,dit=1,decoder=1", show_default=True, help="Worker processes per stage."),
        click.option("--devices", default=None, help="A pool of devices for --placement: cuda:N, cpu, or CPU core sets cpu:A-B (e.g. cpu:0,cpu:1) [default: the placement's devices]."),
        click.option("--placement", default=None, help="The stages of each device, one worker per device and stage: cpu:0=encoder+decoder,cpu:1=dit (instead of --device/--instances); cpu:0=fused: the whole pipeline in one process; auto (the default with --devices): the planner's, under each device's memory."),
        click.option("--threads", type=int, default=None, help="Torch threads per CPU worker [default: cores / CPU workers]."),
        click.option("--slot-mib", type=int, default=None, help="Transport slot size in MiB: one request's stage outputs must fit (long videos need more) [default: 16]."),
        click.option("--policy", type=click.Choice(["static", "elastic"]), default="static", show_default=True,
            help="elastic: move workers between stages on a device as the bottleneck moves (pays off for long-running engines; see `dfuse bench sweep`)."),
        click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto", show_default=True,
            help="Weights and activations dtype; auto: float32 on CPU, bfloat16 on CUDA."),
        click.option("--batching/--no-batching", default=False, show_default=True,
            help="Per-stage batching: a free worker runs compatible queued requests as one call (more throughput under load; "
                 "outputs differ from unbatched ones in the last bits)."),
        click.option("--memory-limit-gib", type=_MemoryLimits(), default=None,
            help="Activation memory a request may use: one number for each device's memory, or per device: "
                 "cpu=8,cuda:0=40 (requests over it are decoded in tiles or refused) [default: detected]."),
        click.option("--max-attempts", type=int, default=None,
            help="A request whose worker dies this many times fails instead of being retried [default: 3]."),
        click.option("--cluster", type=click.Choice(["ray"]), default=None,
            help="ray: devices may name a node of a Ray cluster, NODE/DEVICE (b/cuda:0), NODE being its dfuse-node "
                 "label or IP; its workers start there [default: this host only]."),
        click.option("--ray-address", default=None, help="The Ray head's HOST:PORT, with --cluster ray."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


class _MemoryLimits(click.ParamType):
    """--memory-limit-gib: GiB for each device's memory (8), or device=GiB pairs."""

    name = "GIB|DEVICE=GIB,..."
    toml_kinds = ((str, int, float), "a number or a string of device=GiB pairs")  # read by config_file.py

    def convert(self, value, param, ctx):
        if isinstance(value, (int, float, dict)) and not isinstance(value, bool):  # from a file, or converted
            return value
        try:
            return parse_memory_limits(value)
        except ValueError as e:
            self.fail(str(e).removeprefix("memory_limit_gib: "), param, ctx)


def _read_config_file(ctx: click.Context, param, path: Path | None) -> None:
    """--config: the file's values become the command's defaults, so flags on the command line
    win (click's default_map); read and checked whole before any other option is processed."""
    if path is None:
        return
    ctx.default_map = {**(ctx.default_map or {}), **read_config(path, ctx.command.name, _COMMANDS)}
    ctx.meta[_CONFIG_FILE] = path


_CONFIG_FILE = "dfuse.config_file"
_DEVICE_GROUPS = (("device", "instances"), ("devices", "placement"))  # two ways to say where workers run


def _engine_config(options: dict) -> EngineConfig:
    """EngineConfig from the shared options; ValueError naming the API field (see _with_flag)."""
    from .engine.config import BatchConfig, TransportConfig

    options = _flags_over_file(options)
    slot_mib, max_attempts, limits = options["slot_mib"], options["max_attempts"], options["memory_limit_gib"]
    fields = _device_fields(options["device"], options["instances"], options["devices"], options["placement"])
    if slot_mib is not None:
        fields["transport"] = TransportConfig(slot_mib=slot_mib)
    if max_attempts is not None:
        fields["max_attempts"] = max_attempts
    if limits is not None:
        fields["memory_limit_gib"] = limits
    return EngineConfig(model=options["model"], revision=options["revision"], variant=options["variant"],
                        cpu_threads=options["threads"], policy=options["policy"], dtype=options["dtype"],
                        batching=BatchConfig(enabled=options["batching"]), cluster=options["cluster"],
                        ray_address=options["ray_address"], **fields)


def _flags_over_file(options: dict) -> dict:
    """A config file that says where workers run one way (--device/--instances) yields to a command
    line that says it the other way (--devices/--placement), and the reverse: the flags win."""
    ctx = click.get_current_context(silent=True)
    if ctx is None or _CONFIG_FILE not in ctx.meta:
        return options
    options = dict(options)
    for given, other in (_DEVICE_GROUPS, _DEVICE_GROUPS[::-1]):
        if any(_on_command_line(ctx, name) for name in given) and not any(_on_command_line(ctx, n) for n in other):
            for name in other:
                options[name] = _default_of(ctx, name)
    return options


def _on_command_line(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)


def _default_of(ctx: click.Context, name: str):
    """The option's own default, the file's value aside."""
    (option,) = [p for p in ctx.command.params if p.name == name]
    return option.default


@main.command()
@click.argument("prompt")
@click.option("--negative-prompt", default=None, help="What the image should not show (used when guidance > 1; Flux: with --true-cfg-scale > 1).")
@click.option("--steps", type=int, default=None, help="Denoising steps [default: the model's, 28 for SD3].")
@click.option("--guidance-scale", type=float, default=None, help="Classifier-free guidance, <= 1 turns it off; Flux: the embedded guidance [default: the model's].")
@click.option("--true-cfg-scale", type=float, default=None, help="Flux only: true classifier-free guidance with --negative-prompt when > 1 [default: 1, off].")
@click.option("--height", type=int, default=None, help="Image height in pixels [default: the model's native size].")
@click.option("--width", type=int, default=None, help="Image width in pixels [default: the model's native size].")
@click.option("--num-frames", type=int, default=None, help="Video models (Wan): frames, 4k+1 [default: the model's, 81 for Wan].")
@click.option("--fps", type=click.IntRange(1, 240), default=None, help="Video models: frames per second of the written video (Wan2.1 is made for 16) [default: 16].")
@click.option("--seed", type=int, default=None, help="Random seed [default: random, printed].")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Output file: .png/.jpg/.webp/.bmp for images, .mp4/.gif for videos [default: out.png, out.mp4 for video models].")
@_engine_options
@click.option("--log-level", type=click.Choice(LOG_LEVELS), default=None,
              help="Log level of the engine and its workers [default: warning; info with -v; error with -q].")
@click.option("-q", "--quiet", is_flag=True, help="Print only errors and the final \"Wrote ...\" line.")
@click.option("-v", "--verbose", is_flag=True, help="Show worker placement, queues and engine logs.")
def run(prompt, negative_prompt, steps, guidance_scale, true_cfg_scale, height, width, num_frames, fps, seed, out,
        log_level, quiet, verbose, **engine_options):
    """Generate one image (or video, with a video model) for PROMPT and write it to --out."""
    from .engine.engine import Engine
    from .engine.input_processor import InputProcessor
    from .engine.models import detect_family

    level, quiet, verbose = _log_level(log_level, quiet, verbose)
    logging.basicConfig(level=level.upper(), format="%(levelname)s %(name)s: %(message)s")
    quiet_libraries()  # the hub download and model checks below: their chatter goes through logging
    _echo_records("dfuse.engine.prompts", "Warning: ")  # a prompt cut short: said as the flags' warnings are
    _echo_startup(level)
    say = (lambda message: None) if quiet else (lambda message: click.echo(message, err=True))
    # Validate everything before a single process starts: bad input costs nothing.
    try:
        config = _engine_config(engine_options)
        model_path = resolve_model_path(config.model, config.revision, config.variant)
        info = describe_model(model_path)
        out = _output_path(out, info)
        # The engine's own input processor, minus memory admission (budgets are measured once
        # the workers hold their weights): the same errors as Engine.submit.
        (params,) = InputProcessor.for_config(config, info, detect_family(model_path)).params(
            prompt, negative_prompt, steps, guidance_scale, height, width, seed, true_cfg_scale, num_frames)
        fps = _check_run_flags(info, params, fps)
    except ValueError as e:
        raise click.UsageError(_with_flag(str(e))) from None
    for warning in _ignored_flags(info, params):
        say(f"Warning: {warning}")

    os.environ["DFUSE_LOG"] = level.upper()  # the workers inherit it (stages/worker.py): one level for all
    started = time.perf_counter()
    try:
        with Engine(config=config) as engine:
            say(f"Workers ready in {time.perf_counter() - started:.1f} s")
            with _StepBar(params.num_inference_steps, quiet) as bar:
                future = engine.submit(
                    params.prompt, negative_prompt=params.negative_prompt,
                    num_inference_steps=params.num_inference_steps, guidance_scale=params.guidance_scale,
                    height=params.height, width=params.width, seed=params.seed, on_progress=bar.update,
                    true_cfg_scale=params.true_cfg_scale, num_frames=params.num_frames,
                )
                result = _wait_interruptibly(future)
            if verbose:
                _print_stats(engine.stats())
    except KeyboardInterrupt:
        click.echo("Interrupted: workers stopped, shared memory released.", err=True)
        sys.exit(130)
    except ValueError as e:  # e.g. memory admission, decided once the workers are up
        raise click.UsageError(_with_flag(str(e))) from None
    except RuntimeError as e:
        raise click.ClickException(str(e)) from None

    if result.frames is None:
        _write_atomically(out, lambda path: result.images[0].save(path))
        shape = f"{params.width}x{params.height}"
    else:
        _write_atomically(out, lambda path: _write_video(result.frames[0], path, fps))
        frames = "1 frame" if params.num_frames == 1 else f"{params.num_frames} frames"
        shape = f"{frames} of {params.width}x{params.height} at {fps} fps"
    timings = result.timings[0]
    stage_times = "  ".join(f"{s} {timings[s].compute_s * 1000:.0f} ms" for s in STAGES)
    click.echo(f"Wrote {out} ({shape}, seed {result.seeds[0]})")
    if not quiet:
        click.echo(f"Stage compute: {stage_times}  (total {time.perf_counter() - started:.1f} s with start-up)")


@main.command()
@_engine_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on; anything but loopback needs --api-key (or --insecure-no-api-key).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="TCP port; 0 picks a free one (printed).")
@click.option("--api-key", envvar="DFUSE_API_KEY", default=None, help="Clients must send 'Authorization: Bearer KEY' on every /v1 route [env: DFUSE_API_KEY].")
@click.option("--insecure-no-api-key", is_flag=True, help="Allow a non-loopback --host without --api-key: anyone who can reach it may generate.")
@click.option("--served-model-name", default=None, help="The model id clients use in \"model\" [default: --model as given].")
@click.option("--max-queue", type=click.IntRange(1, 1_000_000), default=1024, show_default=True, help="Images in flight beyond which requests get 429 with Retry-After.")
@click.option("--url-ttl", type=click.FloatRange(1, 7 * 86400), default=3600, show_default=True, help="Seconds a response_format=url image or a video's content stays downloadable.")
@click.option("--grace-period", type=click.FloatRange(0, 3600), default=30, show_default=True, help="On SIGTERM/Ctrl-C: seconds in-flight requests get to finish before the engine closes.")
@click.option("--log-level", type=click.Choice(LOG_LEVELS), default=None,
              help="Log level of the server, the engine and its workers [default: warning; info with -v; error with -q]; debug logs every HTTP request.")
@click.option("-q", "--quiet", is_flag=True, help="Print only errors.")
@click.option("-v", "--verbose", is_flag=True, help="Show engine logs.")
def serve(host, port, api_key, insecure_no_api_key, served_model_name, max_queue, url_ttl, grace_period, log_level,
          quiet, verbose, **engine_options):
    """Serve the model over HTTP: OpenAI's /v1/images/generations and /v1/videos, /v1/models,
    /health, Prometheus /metrics, /v1/stats and a live status page at /."""
    from .serve.server import is_loopback, serve as run_server
    from .serve.state import ServeSettings

    level, quiet, verbose = _log_level(log_level, quiet, verbose)
    logging.basicConfig(level=level.upper(), format="%(levelname)s %(name)s: %(message)s")
    quiet_libraries()  # the hub download and model checks below: their chatter goes through logging
    _echo_startup(level)
    _echo_records("dfuse.serve.status")  # the address, engine ready, draining: plain lines (-q hides them)
    if not is_loopback(host) and not api_key and not insecure_no_api_key:
        raise click.UsageError(_with_flag(f"--host: {host} is reachable beyond this machine; give --api-key (or "
                                          "DFUSE_API_KEY), or --insecure-no-api-key to serve anyone who can reach it"))
    try:
        config = _engine_config(engine_options)
        describe_model(resolve_model_path(config.model, config.revision, config.variant))  # a bad --model fails here, before the port opens
    except ValueError as e:
        raise click.UsageError(_with_flag(str(e))) from None
    os.environ["DFUSE_LOG"] = level.upper()
    settings = ServeSettings(model_name=served_model_name or engine_options["model"], api_key=api_key or None,
                             max_queue=max_queue, url_ttl_s=url_ttl)
    sys.exit(run_server(config, settings, host, port, grace_s=grace_period, log_level=level))


@main.group()
def models():
    """The models dfuse can serve: built-in tiny ones (built offline, deterministically), folders."""


@models.command("list")
def list_models():
    """Built-in tiny models and the diffusers folders in the Hugging Face cache, with their family."""
    from .engine.models.catalog import hub_cache, list_models as found

    rows = found()
    width = max(len(r["model"]) for r in rows)
    for row in rows:
        click.echo(f"{row['model']:<{width}}  {row['family']:<10}  {row['where']}")
    click.echo(f"(Hugging Face cache: {hub_cache()}; a folder path works as --model too)")


@models.command("inspect")
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print the facts as JSON.")
def inspect_model(model, as_json):
    """What MODEL is and needs at its defaults: family, components, weights per stage, slot and
    activation memory (estimates, before any weight is loaded)."""
    import json

    from .engine.models.catalog import inspect_model as inspect

    try:
        doc = inspect(model)
    except ValueError as e:
        raise click.UsageError(str(e).replace("model: ", "MODEL: ", 1)) from None
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    d = doc["defaults"]
    frames = f", {d['num_frames']} frames" if d["num_frames"] > 1 else ""
    click.echo(f"{doc['model']}: {doc['pipeline']} (family {doc['family']}) at {doc['path']}")
    click.echo(f"defaults: {d['width']}x{d['height']}{frames}, {d['num_inference_steps']} steps, guidance {d['guidance_scale']:g}")
    for name, cls in doc["components"].items():
        click.echo(f"  {name:<16} {cls}")
    click.echo("per stage at the defaults: weights, one request's slot, activations float32 / bfloat16")
    for stage, s in doc["stages"].items():
        slot = "-" if s["slot_mib_needed"] is None else f"{s['slot_mib_needed']:g} MiB"
        act = s["activations_gb"]
        click.echo(f"  {stage:<8} {_gb(s['weights_gb'])}  slot {slot}  activations {_gb(act['float32'])} / {_gb(act['bfloat16'])}")


def _gb(gb: float) -> str:
    return f"{gb:.1f} GB" if gb >= 1 else f"{gb * 1000:.1f} MB"


@models.command("build-tiny")
@click.option("--name", default=DEFAULT_MODEL, show_default=True)
@click.option("--rebuild", is_flag=True, help="Build again even if the cached folder exists.")
def build_tiny(name, rebuild):
    """Build a tiny random model in diffusers format and print its folder."""
    from .engine.models.tiny import TINY_MODELS, tiny_model_path

    if name not in TINY_MODELS:
        raise click.UsageError(f"--name: unknown tiny model {name!r}; known: {', '.join(sorted(TINY_MODELS))}")
    click.echo(tiny_model_path(name, rebuild=rebuild))


def _output_path(out: Path | None, info) -> Path:
    """--out, checked against what the model makes: a video model never writes a lone frame to
    an image file (that would drop the video silently), an image model never an .mp4."""
    suffixes, kind = (VIDEO_SUFFIXES, "videos") if info.video else (IMAGE_SUFFIXES, "images")
    if out is None:
        return Path("out" + suffixes[0])
    if out.suffix.lower() not in suffixes:
        raise ValueError(f"--out: the {info.family} model makes {kind}: the file name must end in one of "
                         f"{', '.join(suffixes)} (got {out.name!r})")
    _check_writable(out)
    return out


def _check_run_flags(info, params, fps: int | None) -> int:
    """Flags the engine would ignore without a word, refused here: the user meant something by
    them. Returns the video's frames per second."""
    if fps is not None and not info.video:
        raise ValueError(f"--fps: the {info.family} model makes images; --fps is for video models")
    if params.true_cfg_scale > 1 and params.negative_prompt is None:  # "" counts, as in diffusers
        # The API keeps diffusers' FluxPipeline behaviour (true CFG off without a negative prompt).
        raise ValueError(f"--true-cfg-scale: {params.true_cfg_scale:g} needs --negative-prompt "
                         f"(true CFG guides away from it; without one it would be off)")
    return 16 if fps is None else fps


def _ignored_flags(info, params) -> list[str]:
    """Flags the engine takes but that change nothing, said in a warning: the API keeps diffusers'
    behaviour (a negative prompt without guidance is dropped), the user should still know."""
    if params.negative_prompt is None:
        return []
    if info.true_cfg:  # Flux: --guidance-scale is the embedded guidance; only true CFG reads a negative prompt
        if params.true_cfg_scale > 1:
            return []
        return ["--negative-prompt has no effect without guidance: the flux model guides away from it only "
                "with --true-cfg-scale > 1"]
    if params.guidance_scale > 1:
        return []
    return [f"--negative-prompt has no effect without guidance: --guidance-scale is {params.guidance_scale:g} "
            "(guidance is on when > 1)"]


def _log_level(log_level: str | None, quiet: bool, verbose: bool) -> tuple[str, bool, bool]:
    """(level of the engine and of its workers, quiet, verbose) from --log-level, -q and -v. On
    the command line they win over the config file's: the file's side of a contradiction is dropped."""
    ctx = click.get_current_context()
    given = lambda name: _on_command_line(ctx, name)  # noqa: E731
    if quiet and verbose and given("quiet") != given("verbose"):
        quiet, verbose = (quiet, False) if given("quiet") else (False, verbose)
    if quiet and log_level not in (None, "error") and given("quiet") != given("log_level"):
        quiet, log_level = (quiet, None) if given("quiet") else (False, log_level)
    if quiet and verbose:
        raise click.UsageError(_with_flag("-q/--quiet and -v/--verbose: give one or the other, not both"))
    if quiet and log_level not in (None, "error"):
        raise click.UsageError(_with_flag(f"-q/--quiet and --log-level {log_level}: -q shows errors only; "
                                          "give one or the other"))
    return log_level or ("error" if quiet else "info" if verbose else "warning"), quiet, verbose


class _EchoRecords(logging.Handler):
    """A logger's records as the command's own lines on stderr (the level still filters them)."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"{self.prefix}{record.getMessage()}", err=True)  # the stderr of now (CliRunner swaps it)


def _echo_records(logger_name: str, prefix: str = "") -> None:
    """Show `logger_name`'s records as plain lines instead of log records: once, however many
    times a command runs in this process."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(h, _EchoRecords) for h in logger.handlers):
        logger.addHandler(_EchoRecords(prefix))
    logger.propagate = False


def _echo_startup(level: str) -> None:
    """The engine's start-up progress (engine/startup.py: workers starting, each one ready) as
    plain lines, at every level but error (-q): a wait of seconds to minutes must not look hung."""
    _echo_records("dfuse.engine.startup")
    logging.getLogger("dfuse.engine.startup").setLevel(logging.ERROR if level == "error" else logging.INFO)


def _check_writable(out: Path) -> None:
    """Refuse an --out that cannot be written before any worker starts, not after the work."""
    if out.is_dir():
        raise ValueError(f"--out: {out} is a directory; give a file name")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # Creating a file there is the only sure test (root passes every access() check, /proc refuses).
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=".dfuse-check-"):
            pass
    except OSError as e:
        raise ValueError(f"--out: cannot write in {out.parent} ({e.strerror or e})") from None


def _write_atomically(out: Path, write) -> None:
    """write(path) into a hidden file beside `out` (same suffix: the writers pick the format
    from it), then rename: a failed write never leaves a truncated file at `out`."""
    tmp = str(out.parent / f".{out.stem}-{secrets.token_hex(4)}{out.suffix}")  # the writer creates it: usual mode
    try:
        write(tmp)
        if not os.path.exists(tmp) or os.path.getsize(tmp) == 0:  # a writer that failed without raising
            raise OSError(f"the {out.suffix} writer produced no data")
        os.replace(tmp, out)
    except (OSError, ValueError) as e:
        raise click.ClickException(f"--out: could not write {out}: {e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_video(frames, out: str, fps: int) -> None:
    """diffusers' own writers: export_to_video (imageio-ffmpeg, H.264) or export_to_gif (PIL)."""
    from diffusers.utils import export_to_gif, export_to_video

    if out.lower().endswith(".gif"):
        export_to_gif(frames, out, fps=fps)
    else:
        export_to_video(frames, out, fps=fps)


_FLAGS = {"num_inference_steps": "--steps", "guidance_scale": "--guidance-scale", "negative_prompt": "--negative-prompt",
          "true_cfg_scale": "--true-cfg-scale", "num_frames": "--num-frames",
          "transport.slot_mib": "--slot-mib",
          "num_frames/height/width": "--num-frames/--height/--width",
          "height": "--height", "width": "--width", "height/width": "--height/--width", "seed": "--seed", "model": "--model", "prompt": "PROMPT",
          "cpu_threads": "--threads", "instances": "--instances", "device": "--device", "policy": "--policy",
          "devices": "--devices", "placement": "--placement", "memory_limit_gib": "--memory-limit-gib",
          "max_attempts": "--max-attempts", "batching": "--batching", "cluster": "--cluster",
          "ray_address": "--ray-address"}


def _device_fields(device: str, instances: str, devices: str | None, placement: str | None) -> dict:
    """EngineConfig's device fields from --device/--instances, or from --devices/--placement."""
    if placement is None and devices is None:
        return {"devices": parse_devices(device), "instances": parse_instances(instances)}
    if device != "cpu" or instances != "encoder=1,dit=1,decoder=1":
        raise ValueError("placement: give either --devices/--placement or --device/--instances, not both")
    if placement in (None, "auto"):
        if devices is None:
            raise ValueError("placement: 'auto' places the stages over --devices; give them (e.g. --devices cpu:0,cpu:1)")
        return {"devices": parse_device_list(devices), "placement": "auto"}
    fields = {"placement": parse_placement(placement)}
    if devices is not None:
        fields["devices"] = parse_device_list(devices)
    return fields


def _with_flag(message: str) -> str:
    """Engine errors name the API field ("num_inference_steps: ...", "instances.dit: ...",
    "device (encoder): ..."); say which flag that is, and where its value came from when that
    was the config file rather than the command line."""
    field, sep, rest = message.partition(": ")
    name, _, qualifier = field.partition(" ")
    named = field.startswith("-")  # the CLI's own checks name the flag already
    flag = field if named else _FLAGS.get(field) or _FLAGS.get(name.split(".")[0].split("[")[0])
    if not (sep and flag):
        return message
    if named or field.endswith("[0]") or flag == f"--{field.replace('_', '-')}":
        said = flag  # "prompt[0]": the API's first prompt is the command's only one; "device": --device
    elif qualifier:
        said = f"{flag} {qualifier}"
    else:
        said = f"{flag} ({field})"
    return f"{_from_the_file(said)}: {rest}"


def _from_the_file(said: str) -> str:
    """`said` (a flag and its details), noting the config file when every option it names got its
    value from there: the user looks for it in the file, not on the command line."""
    ctx = click.get_current_context(silent=True)
    if ctx is None or _CONFIG_FILE not in ctx.meta:
        return said
    options = {opt: p.name for p in ctx.command.params if isinstance(p, click.Option) for opt in p.opts}
    named = [options[flag] for flag in re.findall(r"-{1,2}[\w-]+", said.split(" (")[0]) if flag in options]
    if not named or any(ctx.get_parameter_source(n) != ParameterSource.DEFAULT_MAP for n in named):
        return said
    where = f"set in {ctx.meta[_CONFIG_FILE]}"
    return f"{said[:-1]}; {where})" if said.endswith(")") else f"{said} ({where})"


class _StepBar:
    """A progress bar over the DiT's denoising steps, fed from the engine's core thread."""

    def __init__(self, total: int, quiet: bool = False):
        from tqdm import tqdm

        # disable=None: no bar when stderr is not a terminal (a log would get one line per step).
        self._bar = tqdm(total=total, desc="denoising", unit="step", file=sys.stderr, leave=False,
                         disable=True if quiet else None)

    def update(self, stage: str, step: int, total: int) -> None:
        self._bar.n = step
        self._bar.refresh()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._bar.close()


def _wait_interruptibly(future):
    """future.result(), but Ctrl-C always gets through: a SIGINT the kernel hands to another
    thread (the engine core, a progress callback) would leave an untimed wait blocked forever, since
    Python only acts on signals in the main thread when it runs bytecode."""
    from concurrent.futures import TimeoutError as FutureTimeout

    while True:
        try:
            return future.result(timeout=0.2)
        except FutureTimeout:
            continue


def _print_stats(stats) -> None:
    click.echo(f"Model {stats.model} ({stats.family}); completed {stats.completed}, failed {stats.failed}")
    # As --placement writes it: "+" joins a device's workers, and the fused role is "fused".
    placement = "; ".join(f"{d}: {'+'.join(FUSED_ALIAS if s == FUSED else s for s in stages) or 'idle'}"
                          for d, stages in stats.placement.items())
    click.echo(f"Placement ({stats.policy}): {placement}; moves {len(stats.moves)}"
               + (f", switch times {stats.switch_s} s" if stats.switch_s else ""))
    for d in stats.devices:
        click.echo(f"  device {d.name}: {d.kind}, {d.memory_gib:g} GiB, workers {d.workers}, moves {d.moves}")
    click.echo("Queues: " + ", ".join(f"{s} {n}" for s, n in stats.queues.items()))
    wake = stats.cpu_wake_latency_us
    click.echo("Idle CPUs: " + ("as the OS sets them (no CPU latency request)" if wake is None
                                else f"kept quick to wake (CPU latency request: {wake} us)"))
    click.echo(f"CPU workers: {stats.cpu_pinning}")
    click.echo("Stage compute (p50 / p90 of recent tasks): " + ", ".join(
        f"{s} {t.p50} / {t.p90} ms" for s, t in stats.stage_ms.items() if t.tasks))
    for w in stats.workers:
        click.echo(
            f"  worker {w.id}: {w.stage:<8} {w.device:<7} pid {w.pid}  loaded in {w.load_s:.2f} s  "
            f"in flight {w.inflight}  free slots {w.free_slots}  restarts {w.restarts}"
        )


_COMMANDS = {"run": run, "serve": serve}  # the config file's tables

from .bench.commands import bench  # noqa: E402  (after main exists)

main.add_command(bench)

from .bench.profile import profile  # noqa: E402
main.add_command(profile)

if __name__ == "__main__":
    main()

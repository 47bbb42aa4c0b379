"""`dfuse bench ...`: benchmarks of the real engine; results are written as JSON (by default under
./dfuse-bench/; the committed ones are in bench/results/)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .lib.outputs import default_out, write_json


class _LazyGroup(click.Group):
    """Subcommands imported when used, not when `dfuse` starts: several import torch, and a CLI
    that takes a second to start (or prints a traceback for a Ctrl-C meanwhile) serves no one."""

    def __init__(self, *args, lazy: dict[str, str], **kwargs):
        super().__init__(*args, **kwargs)
        self._lazy = lazy  # name -> "module:attribute", relative to this package

    def list_commands(self, ctx) -> list[str]:
        return sorted([*super().list_commands(ctx), *self._lazy])

    def get_command(self, ctx, name):
        if name not in self._lazy:
            return super().get_command(ctx, name)
        from importlib import import_module

        module, _, attribute = self._lazy[name].partition(":")
        return getattr(import_module(module, __package__), attribute)


@click.group(cls=_LazyGroup, lazy={
    "handoff": ".handoff.command:handoff_command", "pipeline": ".pipeline:pipeline_command",
    "simulate": ".simulate.command:simulate", "chaos": ".chaos:chaos_command", "sweep": ".sweep.command:sweep_command",
    "batching": ".batching:batching_command", "dispatch": ".dispatch:dispatch_command",
    "serve": ".serve_command:serve_command", "serve-overhead": ".serve_overhead:serve_overhead_command",
    "cluster": ".cluster:cluster_command",
})
def bench():
    """Benchmarks (results as JSON; speed is always a ratio of two things run side by side)."""


@bench.command()
@click.option("--requests", type=click.IntRange(1, 256), default=16, show_default=True, help="Timed requests per mechanism.")
@click.option("--steps", type=click.IntRange(1, 1000), default=8, show_default=True, help="Denoising steps per request.")
@click.option("--height", type=int, default=256, show_default=True, help="Image height in pixels.")
@click.option("--width", type=int, default=256, show_default=True, help="Image width in pixels.")
@click.option("--guidance-scale", type=float, default=4.5, show_default=True, help="Classifier-free guidance (> 1: batch of 2 in the DiT).")
@click.option("--threads", type=click.IntRange(1, 1024), default=1, show_default=True,
              help="Torch threads of each dfuse worker and of the matched monolithic run (identical images).")
@click.option("--mono-threads", type=click.IntRange(1, 1024), default=None,
              help="Torch threads of the strongest monolithic run [default: all cores].")
@click.option("--model", default=None, help="Built-in tiny model or a local diffusers SD3 folder [default: tiny-sd3].")
@click.option("--warmup", type=click.IntRange(0, 64), default=3, show_default=True, help="Untimed requests per mechanism first.")
@click.option("--rounds", type=click.IntRange(1, 20), default=5, show_default=True,
              help="Time every mechanism this many times, interleaved; the median round is reported.")
@click.option("--attempts", type=click.IntRange(1, 20), default=2, show_default=True,
              help="Repeat a timed phase during which other processes were busy, at most this many runs in all.")
@click.option("--quiet-wait", type=click.FloatRange(0), default=30.0, show_default=True,
              help="Seconds to wait at most for an idle machine before each timed phase.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=default_out("throughput.json"),
              show_default=True, help="Where the JSON result is written.")
def throughput(requests, steps, height, width, guidance_scale, threads, mono_threads, model, warmup, rounds,
               attempts, quiet_wait, out):
    """N requests through dfuse (3 CPU processes) vs diffusers' monolithic pipeline in one process.

    Runs diffusers with --threads threads, diffusers with all cores, then dfuse with --threads per
    worker (all requests submitted at once), checks that dfuse's images equal the matched
    diffusers run's, and writes both throughputs and their ratios to --out.
    """
    from tqdm import tqdm

    from .throughput import format_table, run_throughput

    total = 3 * (rounds * requests + warmup)
    with tqdm(total=total, desc="throughput", unit="req", file=sys.stderr, disable=None) as bar:
        phases: dict[str, int] = {}

        def progress(phase: str, done: int, _total: int) -> None:
            bar.set_description(phase)
            step = done - phases.get(phase, 0)
            if bar.n + step > bar.total:  # a phase repeated because the machine was busy
                bar.total = bar.n + step
            bar.update(step)
            phases[phase] = done

        try:
            doc = run_throughput(requests, steps, height, width, guidance_scale, threads, model, warmup,
                                 mono_threads=mono_threads, rounds=rounds, attempts=attempts,
                                 quiet_wait_s=quiet_wait, progress=progress)
        except ValueError as e:
            raise click.UsageError(str(e)) from None
        except RuntimeError as e:
            raise click.ClickException(str(e)) from None

    write_json(out, doc)
    click.echo(format_table(doc))
    click.echo(f"Wrote {out}")
    if doc["machine_busy_during_timing"]:
        click.secho("WARNING: other processes were busy during the timed runs of "
                    f"{', '.join(doc['machine_busy_during_timing'])}; run again on a quiet machine.",
                    fg="yellow", bold=True, err=True)
    if not doc["outputs_equal"]:
        click.secho(
            f"WARNING: dfuse images differ from diffusers' for requests {doc['outputs_unequal_indices']}: "
            "the throughput comparison is not like for like.", fg="red", bold=True, err=True,
        )
        sys.exit(1)

"""`dfuse profile`: time the real stages of a model on this machine over a small grid and fit the predictor.

Each stage (EncoderStage, DiTStage, DecoderStage, through the model family's adapter) is loaded
once in this process and run on a grid of request shapes; a shape's time is the minimum over
`--repeats` runs after one warm-up (interference from other processes only ever adds time).
Every fourth grid point is held out; the predictor's features (scheduler/predictor.py) are
fitted on the rest and the mean absolute percentage error on the held-out points is reported.
Peak memory per run: allocator peak on CUDA, peak resident set on CPU (Linux; a rough bound).

The output JSON loads with `dfuse.scheduler.predictor.predictor_from_fit`.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path

import click

from ..engine.config import DEFAULT_MODEL
from ..engine.devices import host_memory_bytes
from .lib.meter import CpuMeter
from .lib.outputs import write_json

_EVERY_64 = [(h, w) for h in range(128, 513, 64) for w in range(h, 513, 64)]
GRIDS = {
    # (DiT sizes as (height, width), steps, guidance scales, decoder sizes)
    "default": ([(128, 128), (128, 256), (256, 256), (256, 384), (384, 384), (384, 512), (512, 512)],
                [1, 2, 4, 8], [1.0, 4.5], _EVERY_64),
    "quick": ([(128, 128), (256, 256), (256, 384)], [1, 2], [1.0, 4.5], [(128, 128), (256, 256), (256, 384)]),
    "smoke": ([(128, 128), (128, 256)], [1, 2], [1.0], [(128, 128), (128, 256)]),  # tests: the pipeline, not the fit
}
PROMPTS = ("a red fox in the snow", "a photo of an astronaut riding a horse on the moon at night, high quality")


def run_profile(model: str = DEFAULT_MODEL, device: str = "cpu", kind: str | None = None, threads: int | None = None,
                repeats: int = 3, grid: str = "default", progress=None) -> dict:
    """Measure, fit, and return the profile document (plain data)."""
    import torch

    from ..engine.models import resolve_model_path
    from ..scheduler.core import Shape
    from ..scheduler.predictor import FEATURES, Geometry, fit_stage, mape, size_unit
    from ..stages.decoder import DecoderStage
    from ..stages.dit import DiTStage
    from ..stages.encoder import EncoderStage
    from ..engine.models.base import read_json
    from ..stages.families import load_family

    # 1. Load the three stages, as a worker would.
    # As the engine's CPU workers: the cores shared by three stage processes.
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // 3))
    torch_device = torch.device(device)
    dtype = torch.float32 if torch_device.type == "cpu" else torch.bfloat16
    path = resolve_model_path(model)
    family = load_family(path)
    stages = {cls.kind: cls(family, path, torch_device, dtype) for cls in (EncoderStage, DiTStage, DecoderStage)}
    for stage in stages.values():
        stage.load()
    kind = kind or _device_kind(torch_device)
    vae = read_json(path / "vae" / "config.json")
    transformer = read_json(path / "transformer" / "config.json")
    meter = _Meter(torch_device)

    # 2. Time every grid point: encoder per guidance and prompt, DiT per size/steps/guidance, decoder per size.
    sizes, steps_list, guidances, decoder_sizes = GRIDS[grid]
    samples: list[dict] = []
    plan = [("encoder", (256, 256), 1, g, p) for g in guidances for p in PROMPTS]
    plan += [("dit", hw, s, g, PROMPTS[0]) for hw in sizes for s in steps_list for g in guidances]
    plan += [("decoder", hw, 1, guidances[0], PROMPTS[0]) for hw in decoder_sizes]
    embeds, latents = {}, {}
    text_tokens = 0
    for i, (stage, (height, width), steps, guidance, prompt) in enumerate(plan):
        if progress:
            progress(i, len(plan), stage)
        params = _params(prompt, steps, guidance, height, width)
        if stage == "encoder":
            inputs = {}
        elif stage == "dit":
            inputs = embeds[guidance]
        else:
            if (height, width) not in latents:  # a size the DiT grid skipped: make latents, untimed
                latents[height, width] = _run(stages["dit"], embeds[guidance], _params(prompt, 1, guidance, height, width))
            inputs = latents[height, width]
        seconds, peak_gb, outputs = meter.time(lambda: _run(stages[stage], inputs, params), repeats)
        if stage == "encoder":
            embeds.setdefault(guidance, outputs)
            text_tokens = outputs["prompt_embeds"].shape[1]
        elif stage == "dit" and steps == steps_list[0] and guidance == guidances[0]:
            latents[height, width] = outputs
        shape = Shape(height, width, steps=steps, cfg=guidance > 1, prompt_tokens=77)
        samples.append({"stage": stage, "shape": shape.to_dict(), "seconds": seconds, "peak_gb": peak_gb})

    # 3. Fit on three points in four, report the error on the fourth.
    geometry = Geometry(vae_scale=2 ** (len(vae["block_out_channels"]) - 1), patch=transformer["patch_size"],
                        temporal_scale=1, joint_text_tokens=text_tokens)
    coefficients, report, stage_specs = {}, {}, {}
    for stage in stages:
        points = [(Shape.from_dict(s["shape"]), s["seconds"]) for s in samples if s["stage"] == stage]
        train = [p for j, p in enumerate(points) if j % 4 != 1]
        held = [p for j, p in enumerate(points) if j % 4 == 1]
        coefs = fit_stage(stage, train, geometry)
        coefficients[stage] = {kind: list(coefs)}
        report[stage] = {"mape_heldout": mape(stage, coefs, held, geometry) if held else None,
                         "mape_train": mape(stage, coefs, train, geometry),
                         "points": len(points), "held_out": len(held)}
        for j, s in enumerate(x for x in samples if x["stage"] == stage):
            s["held_out"] = j % 4 == 1
        peaks = [(size_unit(stage, Shape.from_dict(s["shape"]), geometry), s["peak_gb"]) for s in samples
                 if s["stage"] == stage and s["peak_gb"] is not None]
        act = _fit_line(peaks)
        stage_specs[stage] = {"weights_gb": _weights_gb(stages[stage].model), "act_fixed_gb": act[0], "act_per_unit_gb": act[1]}
    return {
        "model": model, "family": family.name, "device": device, "device_kind": kind,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "dtype": str(dtype).replace("torch.", "")},
        "method": f"min of {repeats} runs after 1 warm-up per shape; every 4th point (the 2nd, 6th ...) held out",
        "other_processes_cores": meter.other_cores(),
        "geometry": geometry.__dict__,
        "features": {s: list(FEATURES[s]) for s in stages},
        "coefficients": coefficients,
        "fit": report,
        "stages": stage_specs,
        "devices": {kind: {"memory_gb": meter.memory_gb()}},
        "samples": samples,
    }


def _params(prompt, steps, guidance, height, width):
    from ..engine.protocol import RequestParams

    return RequestParams(prompt, None, steps, guidance, height, width, 0)


def _run(stage, inputs, params):
    """One call of the real stage, its outputs written into a local slot (as a worker's would be)."""
    import torch

    from ..engine.protocol import OutputSlot
    from ..engine.transport.base import SlotWriter, byte_view

    buffer = torch.empty(64 * 2**20, dtype=torch.uint8)
    writer = SlotWriter(lambda pool, offset, shape, dtype: byte_view(buffer, offset, shape, dtype),
                        OutputSlot("profile", 0, buffer.numel()))
    return stage.run(inputs, params, lambda step, total: None, writer)


class _Meter:
    """Wall time, peak memory and how busy the rest of the machine was meanwhile."""

    def __init__(self, device):
        self.device = device
        self._others = self._wall = 0.0

    def time(self, fn, repeats: int):
        import torch

        outputs = fn()  # warm-up (first call at a new shape allocates)
        best, peak = float("inf"), None
        for _ in range(repeats):
            before_rss = self._reset_peak()
            cpu = CpuMeter([os.getpid()])  # the stages run in this process: its CPU time is ours
            started = time.perf_counter()
            fn()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            elapsed = time.perf_counter() - started
            seconds = cpu.read()
            if seconds is not None:
                self._others += seconds[1]
                self._wall += elapsed
            best = min(best, elapsed)
            peak = self._peak_gb(before_rss)
        return best, peak, outputs

    def other_cores(self) -> float | None:
        """Cores other processes kept busy, on average, while we timed (0 = a quiet machine)."""
        return self._others / self._wall if self._wall > 0 else None

    def _reset_peak(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return torch.cuda.memory_allocated(self.device)
        try:  # Linux: writing 5 resets this process's peak resident set (VmHWM)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return _status_kb("VmRSS")
        except OSError:
            return None

    def _peak_gb(self, before):
        import torch

        if before is None:
            return None
        if self.device.type == "cuda":
            return (torch.cuda.max_memory_allocated(self.device) - before) / 1e9
        peak = _status_kb("VmHWM")
        return max(0.0, (peak - before) * 1024 / 1e9) if peak is not None else None

    def memory_gb(self) -> float:
        import torch

        if self.device.type == "cuda":
            return torch.cuda.get_device_properties(self.device).total_memory / 1e9
        return host_memory_bytes() / 1e9


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _weights_gb(model) -> float:
    """Bytes of every parameter and buffer of the torch modules a stage holds, in GB."""
    import torch

    seen, total = set(), 0
    parts = model if isinstance(model, (tuple, list)) else (model,)
    modules = []
    for part in parts:
        if isinstance(part, torch.nn.Module):
            modules.append(part)
        elif hasattr(part, "components"):
            modules += [m for m in part.components.values() if isinstance(m, torch.nn.Module)]
    for module in modules:
        for tensor in list(module.parameters()) + list(module.buffers()):
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total / 1e9


def _fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Non-negative (intercept, slope) of peak GB against the stage's size feature."""
    if len(points) < 2:
        return (points[0][1] if points else 0.0, 0.0)
    xs, ys = zip(*points)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = max(0.0, sum((x - mx) * (y - my) for x, y in points) / var) if var else 0.0
    return max(0.0, my - slope * mx), slope


def _device_kind(device) -> str:
    import torch

    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    return "-".join(name.replace("nvidia", "").split())


def format_report(doc: dict) -> str:
    lines = [f"dfuse profile: {doc['model']} on {doc['device']} ({doc['device_kind']}, "
             f"{doc['machine']['torch_threads']} threads, {doc['machine']['dtype']})",
             f"{'stage':<9}{'points':>7}{'held out':>10}{'MAPE held-out':>15}{'MAPE train':>12}  coefficients"]
    for stage, r in doc["fit"].items():
        coefs = ", ".join(f"{n}={c:.3g}" for n, c in zip(doc["features"][stage], doc["coefficients"][stage][doc["device_kind"]]))
        held = f"{r['mape_heldout']:>14.1%}" if r["mape_heldout"] is not None else f"{'-':>14}"
        lines.append(f"{stage:<9}{r['points']:>7}{r['held_out']:>10}{held}{r['mape_train']:>12.1%}  {coefs}")
    others, spare = doc["other_processes_cores"], doc["machine"]["cpus"] - doc["machine"]["torch_threads"]
    if doc["device"] == "cpu" and others is not None and others > spare + 0.1:
        lines.append(f"WARNING: other processes kept {others:.1f} cores busy while the profile timed on "
                     f"{doc['machine']['torch_threads']} of {doc['machine']['cpus']}: times are noisy; "
                     "run again on a quiet machine.")
    return "\n".join(lines)


@click.command()
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Built-in tiny model or a local diffusers folder.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--kind", default=None, help="Device kind the profile is filed under [default: cpu, or the GPU's name].")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Where the JSON profile goes.")
@click.option("--threads", type=click.IntRange(1, 1024), default=None,
              help="Torch threads [default: cores / 3, what each of the engine's three CPU workers gets].")
@click.option("--repeats", type=click.IntRange(1, 50), default=3, show_default=True, help="Timed runs per shape (min is kept).")
@click.option("--grid", type=click.Choice(sorted(GRIDS)), default="default", show_default=True,
              help="Shapes to time: default (88 points, ~1.5 min), quick (19) or smoke (8, for tests).")
def profile(model, device, kind, out, threads, repeats, grid):
    """Time the real encoder, DiT and decoder of MODEL on DEVICE and fit the scheduler's predictor."""
    from tqdm import tqdm

    with tqdm(total=1, desc="profile", unit="shape", file=sys.stderr, disable=None) as bar:
        def progress(i, total, stage):
            bar.total = total
            bar.set_postfix_str(stage)
            bar.update(i + 1 - bar.n)

        try:
            doc = run_profile(model, device, kind, threads, repeats, grid, progress)
        except ValueError as e:
            raise click.UsageError(str(e)) from None
    write_json(out, doc, indent=1)
    click.echo(format_report(doc))
    click.echo(f"Wrote {out}")

"""Performance predictor: latency and peak memory of a stage on a device kind for a request shape.

Each stage's latency is linear in a few features of the shape (non-negative coefficients, one set
per (stage, device kind)):

    encoder  t = c0 + c1 * rows*tokens/100                        rows = batch x2 under CFG
    dit      t = c0 + steps * (c1 + c2 * rows*N/1e3 + c3 * rows*(N/1e3)^2)
                                                                  N = latent patches (+ joint text tokens)
    decoder  t = c0 + batch*frames * (c1 * megapixels + c2 * megapixels^2)
                                                                  (the VAE's mid-block attends over latent pixels)

The coefficients come either from a fit to measured samples (`fit`, what `dfuse profile` does)
or from published reference latencies scaled to other devices by a compute / bandwidth mix
(`from_profiles`, the simulator's cluster profiles). Memory is weights + an activation term
linear in the stage's size feature. A stage whose weights do not fit its device streams the
non-resident part over the host link on every pass (a DiT step or a whole encode/decode):

    streamed (overlapped)   pass = max(compute, streamed GB / host link GB/s)
    offload (diffusers)     pass = compute + GB / pageable GB/s, whole components moved per request

Pure Python on plain numbers; numpy only for the least-squares fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Iterable, Mapping, Sequence

from .core import FUSED, STAGES, Shape, is_fused, stages_of

FEATURES = {
    "encoder": ("fixed", "rows_tokens"),
    "dit": ("fixed", "steps", "steps_rows_ktok", "steps_rows_ktok2"),
    "decoder": ("fixed", "megapixels", "megapixels2"),
}
# Residency order when several stages share a device and not all fit: the DiT runs once per step,
# the others once per request, so the DiT's weights are the ones worth keeping on the device.
_RESIDENCY_ORDER = ("dit", "encoder", "decoder")


@dataclass(frozen=True)
class Geometry:
    """How a model turns pixels into DiT tokens."""

    vae_scale: int = 8
    patch: int = 2
    temporal_scale: int = 4
    """Video VAEs compress time: latent frames = 1 + (frames - 1) // temporal_scale."""
    joint_text_tokens: int = 0
    """Text tokens inside the DiT's joint attention (SD3 333, Flux 512; 0 for cross-attention)."""

    def tokens(self, shape: Shape) -> int:
        per = self.vae_scale * self.patch
        latent_frames = 1 + (shape.frames - 1) // self.temporal_scale
        return -(-shape.height // per) * -(-shape.width // per) * latent_frames + self.joint_text_tokens


@dataclass(frozen=True)
class DeviceSpec:
    kind: str
    memory_gb: float
    host_link_gbs: float = math.inf
    """Pinned host -> device bandwidth (weight streaming, loading a stage)."""
    pageable_gbs: float = math.inf
    """Pageable host -> device bandwidth (diffusers-style CPU offload)."""
    tflops: float = 0.0
    mem_bw_tbs: float = 0.0
    price_usd_h: float = 0.0
    usable_fraction: float = 0.92
    """Share of memory left to weights + activations (CUDA context, allocator slack)."""

    @property
    def usable_gb(self) -> float:
        return self.memory_gb * self.usable_fraction


@dataclass(frozen=True)
class StageSpec:
    weights_gb: float
    act_fixed_gb: float = 0.0
    act_per_unit_gb: float = 0.0
    """Activation GB per unit of the stage's size feature (rows*tokens/100, rows*kilotokens, megapixels)."""


def features(stage: str, shape: Shape, geometry: Geometry) -> tuple[float, ...]:
    if stage == "encoder":
        return (1.0, shape.rows * shape.prompt_tokens / 100)
    if stage == "dit":
        k = geometry.tokens(shape) / 1e3
        return (1.0, float(shape.steps), shape.steps * shape.rows * k, shape.steps * shape.rows * k * k)
    if stage == "decoder":
        mp = shape.height * shape.width / 1e6
        return (1.0, shape.batch * shape.frames * mp, shape.batch * shape.frames * mp * mp)
    raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")


def size_unit(stage: str, shape: Shape, geometry: Geometry) -> float:
    """The size feature activations grow with (see StageSpec.act_per_unit_gb)."""
    if stage == "encoder":
        return shape.rows * shape.prompt_tokens / 100
    if stage == "dit":
        return shape.rows * geometry.tokens(shape) / 1e3
    return shape.batch * shape.frames * shape.height * shape.width / 1e6


def passes(stage: str, shape: Shape) -> int:
    """Forward passes per request: weights that do not fit are streamed once per pass."""
    return shape.steps if stage == "dit" else 1


class Predictor:
    """latency(stage, device kind, shape) in seconds and memory_gb(...) for one model."""

    def __init__(
        self,
        geometry: Geometry,
        stages: Mapping[str, StageSpec],
        devices: Mapping[str, DeviceSpec],
        coefficients: Mapping[tuple[str, str], Sequence[float]],
        scale: Mapping[tuple[str, str], float] | None = None,
        process_start_s: float = 5.0,
    ):
        self.geometry = geometry
        self.stages = MappingProxyType(dict(stages))
        self.devices = MappingProxyType(dict(devices))
        self.coefficients = MappingProxyType({k: tuple(float(c) for c in v) for k, v in coefficients.items()})
        for (stage, kind), coefs in self.coefficients.items():
            if len(coefs) != len(FEATURES[stage]):
                raise ValueError(f"coefficients[{stage}, {kind}]: expected {len(FEATURES[stage])} values, got {len(coefs)}")
        self.scale = MappingProxyType(dict(scale or {}))
        self.process_start_s = process_start_s
        self._cache: dict = {}

    # 1. Views
    def corrected(self, factors: Mapping[tuple[str, str], float]) -> "Predictor":
        """The same predictor with latencies of (stage, kind) multiplied by `factors` (feedback)."""
        merged = dict(self.scale)
        for key, factor in factors.items():
            merged[key] = merged.get(key, 1.0) * factor
        return Predictor(self.geometry, self.stages, self.devices, self.coefficients, merged, self.process_start_s)

    def kinds(self, stage: str) -> list[str]:
        return [kind for (s, kind) in self.coefficients if s == stage]

    def knows(self, stage: str, kind: str) -> bool:
        return (stage, kind) in self.coefficients

    # 2. Latency
    def compute_s(self, stage: str, kind: str, shape: Shape) -> tuple[float, float]:
        """(per-request fixed seconds, seconds per pass) with every weight resident."""
        try:
            coefs = self.coefficients[stage, kind]
        except KeyError:
            raise ValueError(f"no profile for stage {stage!r} on device kind {kind!r}") from None
        x = features(stage, shape, self.geometry)
        total = sum(a * b for a, b in zip(coefs, x)) * self.scale.get((stage, kind), 1.0)
        fixed = coefs[0] * self.scale.get((stage, kind), 1.0)
        return fixed, (total - fixed) / passes(stage, shape)

    def latency(self, stage: str, kind: str, shape: Shape, colocated: frozenset = frozenset(),
                offload: bool = False) -> float:
        """Seconds for `stage` of one request of `shape` on a `kind` device.

        `colocated`: other stages whose weights share the device (they may push this stage's
        weights out: see `streamed_gb`). `offload`: diffusers-style CPU offload instead of
        overlapped streaming, for the monolithic baseline users run.
        """
        key = (stage, kind, shape, colocated, offload)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        fixed, per_pass = self.compute_s(stage, kind, shape)
        n = passes(stage, shape)
        device = self.devices.get(kind)
        moved_gb, streamed_gb = self.transfer_gb(stage, kind, shape, colocated, offload) if device else (0.0, 0.0)
        if offload:
            fixed += moved_gb / device.pageable_gbs if moved_gb else 0.0
            per_pass += streamed_gb / device.pageable_gbs if streamed_gb else 0.0
        elif streamed_gb:
            per_pass = max(per_pass, streamed_gb / device.host_link_gbs)
        seconds = fixed + n * per_pass
        self._cache[key] = seconds
        return seconds

    def transfer_gb(self, stage: str, kind: str, shape: Shape, colocated: frozenset = frozenset(),
                    offload: bool = False) -> tuple[float, float]:
        """(GB moved to the device once per request, GB streamed on every pass) for `stage`."""
        hosted = (set(colocated) | {stage}) - {FUSED}  # a fused combo's marker holds no weights
        usable = self.devices[kind].usable_gb
        act = max(self.activation_gb(s, shape) for s in hosted)
        weights = {s: self.stages[s].weights_gb for s in hosted}
        if sum(weights.values()) + act <= usable:
            return 0.0, 0.0
        if offload:
            # diffusers: model offload moves whole components per request when each fits alone;
            # a component that does not fit alone is offloaded layer by layer on every pass.
            if weights[stage] + act <= usable:
                return weights[stage], 0.0
            return 0.0, weights[stage]
        free = max(0.0, usable - act)
        for s in _RESIDENCY_ORDER:
            if s in hosted:
                resident = min(weights[s], free)
                free -= resident
                if s == stage:
                    return 0.0, weights[s] - resident
        raise AssertionError("unreachable")

    # 3. Memory
    def activation_gb(self, stage: str, shape: Shape) -> float:
        spec = self.stages[stage]
        return spec.act_fixed_gb + spec.act_per_unit_gb * size_unit(stage, shape, self.geometry)

    def memory_gb(self, stage: str, kind: str, shape: Shape) -> float:
        """Peak GB of `stage` for `shape` with all its weights resident (device-independent here)."""
        return self.stages[stage].weights_gb + self.activation_gb(stage, shape)

    def fits(self, stages: frozenset, kind: str, shapes: Iterable[Shape], streaming: bool = True) -> str | None:
        """'resident' if every weight and the largest activation fit, 'streamed' if the weights fit
        only by streaming (allowed with `streaming`), else None.

        Streaming is allowed for a single stage and for the fused combo: one process running whole
        requests keeps what fits resident (the DiT first) and streams the rest on every pass, which is
        exactly how the monolithic baseline runs (see `transfer_gb`). Several stage processes sharing
        a device do not stream: nothing arbitrates their residency."""
        usable = self.devices[kind].usable_gb
        shapes = list(shapes)
        real = stages_of(stages)
        act = max(self.activation_gb(s, shape) for s in real for shape in shapes)
        if sum(self.stages[s].weights_gb for s in real) + act <= usable:
            return "resident"
        if streaming and (len(real) == 1 or is_fused(stages)) and act < usable:
            return "streamed"
        return None

    def load_s(self, stages: frozenset, kind: str) -> float:
        """Seconds to start the processes of `stages` on a `kind` device and load their weights."""
        stages = stages_of(stages)
        if not stages:
            return 0.0
        device = self.devices[kind]
        gb = min(sum(self.stages[s].weights_gb for s in stages), device.usable_gb)
        return self.process_start_s + (gb / device.host_link_gbs if math.isfinite(device.host_link_gbs) else 0.0)

    def price_usd_h(self, kind: str) -> float:
        return self.devices[kind].price_usd_h


# 4. Fitting and building


def fit_stage(stage: str, samples: Sequence[tuple[Shape, float]], geometry: Geometry) -> tuple[float, ...]:
    """Non-negative coefficients minimising the squared *relative* error over `samples`.

    Least squares on rows scaled by 1/seconds; a coefficient that comes out negative is pinned to
    zero and the rest refitted (an active set, enough for 2-4 features).
    """
    import numpy as np

    if not samples:
        raise ValueError(f"fit_stage({stage}): no samples")
    x = np.array([features(stage, shape, geometry) for shape, _ in samples], dtype=float)
    y = np.array([seconds for _, seconds in samples], dtype=float)
    if (y <= 0).any():
        raise ValueError(f"fit_stage({stage}): latencies must be > 0")
    a, b = x / y[:, None], np.ones(len(y))
    active = [j for j in range(x.shape[1]) if np.any(x[:, j] != x[0, j]) or j == 0]
    while True:
        coef = np.zeros(x.shape[1])
        solution, *_ = np.linalg.lstsq(a[:, active], b, rcond=None)
        coef[active] = solution
        if (coef >= 0).all() or len(active) == 1:
            return tuple(float(max(c, 0.0)) for c in coef)
        active.remove(active[int(np.argmin(solution))])


def mape(stage: str, coefs: Sequence[float], samples: Sequence[tuple[Shape, float]], geometry: Geometry) -> float:
    """Mean absolute percentage error of `coefs` on `samples` (0.05 = 5 %)."""
    errors = [abs(sum(c * f for c, f in zip(coefs, features(stage, shape, geometry))) - y) / y for shape, y in samples]
    return sum(errors) / len(errors)


def predictor_from_profiles(model: Mapping, devices: Mapping) -> Predictor:
    """Build a predictor from the JSON profiles in bench/profiles (see their README).

    A stage's coefficients on the model's reference device come from one published latency and
    stated splits (fixed share, attention share: estimates); on another device they are scaled by
    `compute_fraction * tflops_ratio + (1 - compute_fraction) * bandwidth_ratio` (estimate).
    """
    geometry = Geometry(**model.get("geometry", {}))
    specs = {kind: device_spec(kind, d) for kind, d in devices["devices"].items()}
    stages, coefficients = {}, {}
    for stage in STAGES:
        s = model["stages"][stage]
        act = s.get("activation_gb", [0.0, 0.0])
        stages[stage] = StageSpec(s["weights_gb"], act[0], act[1])
        ref = s["reference"]
        ref_device = specs[ref["device"]]
        shape = Shape.from_dict(ref["shape"])
        reference = _reference_coefficients(stage, s, shape, ref["seconds"], geometry)
        cf = s.get("compute_fraction", 1.0)
        for kind, spec in specs.items():
            if kind == "cpu" or not spec.tflops or not spec.mem_bw_tbs:
                continue
            ratio = cf * ref_device.tflops / spec.tflops + (1 - cf) * ref_device.mem_bw_tbs / spec.mem_bw_tbs
            coefficients[stage, kind] = tuple(c * ratio for c in reference)
    return Predictor(geometry, stages, specs, coefficients, process_start_s=devices.get("process_start_s", 5.0))


def device_spec(kind: str, d: Mapping) -> DeviceSpec:
    return DeviceSpec(
        kind=kind, memory_gb=d["memory_gb"], host_link_gbs=d.get("host_link_gbs", math.inf),
        pageable_gbs=d.get("pageable_gbs", math.inf), tflops=d.get("bf16_tflops", 0.0),
        mem_bw_tbs=d.get("mem_bw_tbs", 0.0), price_usd_h=d.get("price_usd_h", 0.0),
        usable_fraction=d.get("usable_fraction", 0.92),
    )


def _reference_coefficients(stage: str, s: Mapping, shape: Shape, seconds: float, geometry: Geometry) -> tuple:
    fixed_share = s.get("fixed_share", 0.0)
    x = features(stage, shape, geometry)
    if stage == "encoder":
        fixed = fixed_share * seconds
        return (fixed, (seconds - fixed) / x[1])
    if stage == "decoder":
        fixed = fixed_share * seconds
        attention = s.get("attention_share", 0.0) * (seconds - fixed)
        return (fixed, (seconds - fixed - attention) / x[1], attention / x[2])
    # `seconds` is one denoising step at the reference shape; the request-level fixed cost is separate.
    step_overhead = s.get("step_overhead_share", 0.0) * seconds
    rest = seconds - step_overhead
    attention = s.get("attention_share", 0.0) * rest
    k = geometry.tokens(shape) / 1e3
    return (s.get("fixed_s", 0.0), step_overhead, (rest - attention) / (shape.rows * k), attention / (shape.rows * k * k))


def predictor_from_fit(doc: Mapping) -> Predictor:
    """Load what `dfuse profile` wrote: fitted coefficients, stage memory and the device measured."""
    geometry = Geometry(**doc["geometry"])
    stages = {s: StageSpec(**v) for s, v in doc["stages"].items()}
    devices = {kind: device_spec(kind, d) for kind, d in doc["devices"].items()}
    coefficients = {(s, kind): tuple(c) for s, per_kind in doc["coefficients"].items() for kind, c in per_kind.items()}
    return Predictor(geometry, stages, devices, coefficients, process_start_s=doc.get("process_start_s", 2.5))


__all__ = [
    "FEATURES", "Geometry", "DeviceSpec", "StageSpec", "Predictor", "features", "fit_stage", "mape",
    "predictor_from_profiles", "predictor_from_fit", "device_spec", "passes", "size_unit",
]

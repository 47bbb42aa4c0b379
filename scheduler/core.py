"""Plain data shared by the scheduler modules: request shapes, devices, placements, moves, stats.

Everything here is a frozen dataclass of numbers, strings and tuples: the live engine and the
simulator build these from their own state and hand them to the predictor, planner and
controller; nothing here knows about processes, sockets or clocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Iterable, Mapping

# The pipeline's stages, in order: the one vocabulary the scheduler, the engine and the workers share.
STAGES = ("encoder", "dit", "decoder")
Combo = frozenset  # the set of stages one device hosts; empty = idle

# The fused role: one process holds the whole pipeline and runs each request start to finish,
# with no handoff. It is a worker's role name in the engine and a placement's token for it; in a
# scheduler combo it marks a device whose stages run fused (FUSED_COMBO), as opposed to the same
# three stages in three processes taking turns on the device.
FUSED = "+".join(STAGES)
FUSED_COMBO = frozenset((*STAGES, FUSED))


def is_fused(stages: Iterable[str]) -> bool:
    return FUSED in stages


def stages_of(stages: Iterable[str]) -> tuple[str, ...]:
    """The pipeline stages of a combo (a fused combo's three), in pipeline order."""
    stages = set(stages)
    return tuple(s for s in STAGES if s in stages)


@dataclass(frozen=True, order=True)
class Shape:
    """What a request costs depends on: its output size, steps, guidance and prompt length."""

    height: int = 1024
    width: int = 1024
    steps: int = 28
    frames: int = 1
    """Video frames (1 for an image)."""
    cfg: bool = False
    """Classifier-free guidance run as a batch of 2 (negative + positive) in encoder and DiT."""
    batch: int = 1
    """Outputs per request (prompts batched together)."""
    prompt_tokens: int = 77

    def __post_init__(self):
        for name in ("height", "width", "steps", "frames", "batch", "prompt_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Shape.{name}: must be an integer >= 1 (got {value!r})")

    @property
    def rows(self) -> int:
        """Rows through the encoder and DiT: the batch, doubled under classifier-free guidance."""
        return self.batch * (2 if self.cfg else 1)

    def label(self) -> str:
        video = f"x{self.frames}f" if self.frames > 1 else ""
        return f"{self.width}x{self.height}{video}/{self.steps}st{'/cfg' if self.cfg else ''}"

    @classmethod
    def from_dict(cls, d: Mapping) -> "Shape":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class Device:
    """One accelerator (or a CPU) the scheduler may place stage instances on."""

    id: str
    kind: str
    """Key into the device profiles (h100, l4, cpu ...)."""


def combo(*stages: str) -> frozenset:
    """The combo of `stages`; combo(FUSED) is FUSED_COMBO."""
    if FUSED in stages:
        if len(stages) > 1:
            raise ValueError(f"{FUSED} (the fused role) holds the whole pipeline: a device hosting it hosts nothing else")
        return FUSED_COMBO
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}; stages are {', '.join(STAGES)} or {FUSED}")
    return frozenset(stages)


def combo_label(stages: Iterable[str]) -> str:
    """'E', 'T', 'D', 'E+D' ... in pipeline order; 'fused' for the fused role; 'idle' for none."""
    stages = set(stages)
    if FUSED in stages:
        return "fused"
    letters = {"encoder": "E", "dit": "T", "decoder": "D"}
    parts = [letters[s] for s in STAGES if s in stages]
    return "+".join(parts) or "idle"


@dataclass(frozen=True)
class Placement:
    """Which stages each device hosts (one instance per stage per device)."""

    assignment: Mapping[str, frozenset]
    """device id -> stages it hosts."""

    def __post_init__(self):
        object.__setattr__(self, "assignment", MappingProxyType({d: frozenset(s) for d, s in self.assignment.items()}))

    def instances(self, stage: str) -> list[str]:
        return [d for d, stages in self.assignment.items() if stage in stages]

    def counts(self) -> dict[str, int]:
        return {s: len(self.instances(s)) for s in STAGES}

    def diff(self, target: "Placement") -> list["Move"]:
        """Moves that turn this placement into `target`, in device id order."""
        return [
            Move(d, self.assignment.get(d, frozenset()), stages)
            for d, stages in sorted(target.assignment.items())
            if self.assignment.get(d, frozenset()) != stages
        ]

    def summary(self, devices: Iterable[Device] | None = None) -> str:
        """'E+D x2 T x6' (or per kind: 'h100: T x4 | l4: E+D x4')."""
        def count(ids):
            labels: dict[str, int] = {}
            for d in ids:
                label = combo_label(self.assignment[d])
                labels[label] = labels.get(label, 0) + 1
            return " ".join(f"{k} x{v}" for k, v in sorted(labels.items()))

        if devices is None:
            return count(sorted(self.assignment))
        by_kind: dict[str, list[str]] = {}
        for dev in devices:
            if dev.id in self.assignment:
                by_kind.setdefault(dev.kind, []).append(dev.id)
        return " | ".join(f"{kind}: {count(ids)}" for kind, ids in by_kind.items())


@dataclass(frozen=True)
class Move:
    """Turn device `device` from hosting `src` into hosting `dst` (drain first, then load)."""

    device: str
    src: frozenset
    dst: frozenset


@dataclass(frozen=True)
class Demand:
    """What the cluster must serve: a request mix (fractions summing to 1) at some rate."""

    mix: tuple[tuple[Shape, float], ...]
    rate_rps: float = 0.0

    def __post_init__(self):
        if not self.mix:
            raise ValueError("Demand.mix: needs at least one shape")
        total = sum(w for _, w in self.mix)
        if total <= 0 or any(w < 0 for _, w in self.mix):
            raise ValueError(f"Demand.mix: weights must be >= 0 and not all 0 (got {self.mix!r})")
        object.__setattr__(self, "mix", tuple((s, w / total) for s, w in self.mix))

    @classmethod
    def of(cls, shapes: Mapping[Shape, float] | Iterable[tuple[Shape, float]] | Shape, rate_rps: float = 0.0) -> "Demand":
        if isinstance(shapes, Shape):
            return cls(((shapes, 1.0),), rate_rps)
        items = shapes.items() if isinstance(shapes, Mapping) else shapes
        return cls(tuple(sorted(items)), rate_rps)


@dataclass(frozen=True)
class Stats:
    """A snapshot of what the feedback module has seen (built by Feedback.snapshot)."""

    now: float
    rate_rps: float
    """Arrivals per second over the sliding window."""
    mix: tuple[tuple[Shape, float], ...]
    """Request shapes seen over the window, as fractions (empty before the first arrival)."""
    arrivals: int
    """Arrivals inside the window (how much the mix estimate can be trusted)."""
    queue_depths: Mapping[str, int] = field(default_factory=dict)
    """Requests waiting per stage at the last gauge sample."""
    utilization: Mapping[str, float] = field(default_factory=dict)
    """Busy fraction of each stage's instances, averaged over the utilization window."""
    corrections: Mapping[tuple[str, str], float] = field(default_factory=dict)
    """(stage, device kind) -> smoothed observed / predicted latency."""
    in_system: tuple[tuple[Shape, int], ...] = ()
    """Requests admitted and not finished yet, per shape (the work already waiting)."""

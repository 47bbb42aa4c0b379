"""Runtime feedback: what the running system tells the scheduler, folded into plain statistics.

- every finished stage task: observed / predicted seconds, smoothed per instance (an EWMA of the
  log ratio, so one 3x outlier moves it as much as one 1/3x outlier) and summarised per
  (stage, device kind) for the planner;
- every admitted request: its shape, kept over a sliding window -> arrival rate and request mix;
- gauges sampled by the caller: queue depth and busy instances per stage -> utilisation.

The caller owns the clock: every method takes the time `t` in seconds (virtual in the simulator,
monotonic in the engine).
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass
from typing import Hashable, Mapping

from .core import STAGES, Shape, Stats


@dataclass(frozen=True)
class FeedbackConfig:
    window_s: float = 60.0
    """Sliding window for the arrival rate and the request mix..."""
    min_window_arrivals: int = 30
    """...stretched back (up to max_window_s) to hold at least this many arrivals at low rates."""
    max_window_s: float = 3600.0
    alpha: float = 0.2
    """EWMA weight of a new observed / predicted ratio (per instance)."""
    utilization_window_s: float = 10.0
    """Gauge samples averaged into Stats.utilization."""

    def __post_init__(self):
        if not 0 < self.window_s <= self.max_window_s or not self.utilization_window_s > 0:
            raise ValueError("FeedbackConfig: windows must be > 0")
        if not 0 < self.alpha <= 1:
            raise ValueError(f"FeedbackConfig.alpha: must be in (0, 1] (got {self.alpha!r})")


class Feedback:
    """Collects timings, arrivals and gauges; `snapshot(now)` gives the controller a Stats."""

    def __init__(self, config: FeedbackConfig | None = None):
        self.config = config or FeedbackConfig()
        self._log_ratio: dict[Hashable, float] = {}  # instance -> EWMA of log(observed / predicted)
        self._instance_key: dict[Hashable, tuple[str, str]] = {}  # instance -> (stage, device kind)
        self._arrivals: collections.deque[tuple[float, Shape]] = collections.deque()
        self._mix: collections.Counter[Shape] = collections.Counter()
        self._first_arrival: float | None = None
        self._in_system: collections.Counter[Shape] = collections.Counter()
        self._gauges: collections.deque[tuple[float, dict, dict]] = collections.deque()
        self.observations = 0

    # 1. Inputs
    def observe(self, instance_id: Hashable, stage: str, predicted_s: float, observed_s: float, t: float,
                device_kind: str | None = None) -> None:
        """A task of `stage` finished on `instance_id` in `observed_s`; the predictor said `predicted_s`."""
        if predicted_s <= 0 or observed_s <= 0:
            return  # nothing to learn from a zero-length task
        ratio = math.log(observed_s / predicted_s)
        previous = self._log_ratio.get(instance_id)
        a = self.config.alpha
        self._log_ratio[instance_id] = ratio if previous is None else (1 - a) * previous + a * ratio
        if device_kind is not None:
            self._instance_key[instance_id] = (stage, device_kind)
        self.observations += 1

    def arrival(self, t: float, shape: Shape) -> None:
        """A request of `shape` was admitted at `t`."""
        if self._first_arrival is None:
            self._first_arrival = t
        self._arrivals.append((t, shape))
        self._mix[shape] += 1
        self._in_system[shape] += 1
        self._expire(t)

    def finished(self, t: float, shape: Shape) -> None:
        """A request of `shape` left the system (done, failed or cancelled)."""
        if self._in_system[shape] > 0:
            self._in_system[shape] -= 1

    def gauge(self, t: float, queue_depths: Mapping[str, int], busy: Mapping[str, float],
              instances: Mapping[str, int]) -> None:
        """Sample of the live state: requests waiting and busy / total instances per stage."""
        util = {s: (busy.get(s, 0) / instances[s]) if instances.get(s) else 0.0 for s in STAGES}
        self._gauges.append((t, dict(queue_depths), util))
        while self._gauges and self._gauges[0][0] <= t - self.config.utilization_window_s:
            self._gauges.popleft()

    def forget(self, instance_id: Hashable) -> None:
        """The instance is gone (moved to another stage, stopped)."""
        self._log_ratio.pop(instance_id, None)
        self._instance_key.pop(instance_id, None)

    # 2. Outputs
    def correction(self, instance_id: Hashable, default: float = 1.0) -> float:
        """Observed / predicted for this instance; `default` before its first observation."""
        log_ratio = self._log_ratio.get(instance_id)
        return default if log_ratio is None else math.exp(log_ratio)

    def corrections(self) -> dict[tuple[str, str], float]:
        """(stage, device kind) -> geometric mean of its instances' corrections."""
        groups: dict[tuple[str, str], list[float]] = {}
        for instance, key in self._instance_key.items():
            if instance in self._log_ratio:
                groups.setdefault(key, []).append(self._log_ratio[instance])
        return {key: math.exp(sum(v) / len(v)) for key, v in groups.items()}

    def snapshot(self, now: float) -> Stats:
        self._expire(now)
        n = len(self._arrivals)
        rate = 0.0
        if n:
            # The window spans window_s (less early on); stretched back to the oldest arrival kept
            # when fewer than min_window_arrivals fell inside it.
            span = max(min(self.config.window_s, now - self._first_arrival), now - self._arrivals[0][0])
            rate = n / span if span > 0 else 0.0
        mix = tuple(sorted((shape, count / n) for shape, count in self._mix.items())) if n else ()
        if self._gauges:
            queues = self._gauges[-1][1]
            util = {s: sum(g[2][s] for g in self._gauges) / len(self._gauges) for s in STAGES}
        else:
            queues, util = {}, {}
        in_system = tuple(sorted((shape, n) for shape, n in self._in_system.items() if n > 0))
        return Stats(now, rate, mix, n, queues, util, self.corrections(), in_system)

    def _expire(self, now: float) -> None:
        c = self.config
        horizon, oldest = now - c.window_s, now - c.max_window_s
        while self._arrivals and (
            self._arrivals[0][0] < oldest or (self._arrivals[0][0] < horizon and len(self._arrivals) > c.min_window_arrivals)
        ):
            _, shape = self._arrivals.popleft()
            self._mix[shape] -= 1
            if not self._mix[shape]:
                del self._mix[shape]

"""Prometheus metrics (prometheus-client, text format at GET /metrics).

Two sources: what the server sees as requests end (outcomes, latency, per-stage timings of each
image), and, at each scrape, a snapshot of `engine.stats()` (queues, workers, moves, restarts).
Names follow Prometheus' conventions (snake_case, unit suffix, `_total` counters); labels as
SGLang's and vLLM-Omni's diffusion metrics use them (stage, device, link, outcome)."""

from __future__ import annotations

from collections import Counter
from typing import Callable

from prometheus_client import CollectorRegistry, Counter as PromCounter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ..scheduler.core import STAGES

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds: from a 128 px tiny model on a CPU (tens of ms) to a long video on a GPU (many minutes).
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000)
HANDOFF_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)


class Metrics:
    def __init__(self, stats: Callable):
        """stats: returns the engine's EngineStats now, or None while the engine starts."""
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = PromCounter("dfuse_requests", "HTTP generation requests by endpoint and outcome "
                                    "(completed, failed, invalid, rejected, cancelled, timeout, unavailable)",
                                    ["endpoint", "outcome"], registry=r)
        self.latency = Histogram("dfuse_request_latency_seconds", "End-to-end latency of completed requests, "
                                 "received -> response ready", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("dfuse_request_queue_time_seconds", "Per image: seconds waiting for a worker "
                                    "(engine queues and worker queues, all stages)", buckets=LATENCY_BUCKETS, registry=r)
        self.compute = Histogram("dfuse_stage_compute_seconds", "Per image and stage: compute time of its worker "
                                 "(a batch's whole call)", ["stage", "device"], buckets=LATENCY_BUCKETS, registry=r)
        self.handoff = Histogram("dfuse_handoff_seconds", "Per image and link: getting the producer's outputs "
                                 "into the consumer worker", ["link"], buckets=HANDOFF_BUCKETS, registry=r)
        self.running = Gauge("dfuse_requests_running", "Images submitted to the engine and not finished",
                             registry=r)
        r.register(_EngineCollector(stats))

    def observe_images(self, timings: list[dict]) -> None:
        """timings: per image, stage -> engine StageTiming."""
        for per_stage in timings:
            self.queue_time.observe(sum(t.waited_s + t.queued_s for t in per_stage.values()))
            for stage, t in per_stage.items():
                self.compute.labels(stage, t.device).observe(t.compute_s)
                index = STAGES.index(stage)
                if index and not t.fused:  # a fused worker hands nothing over between its stages
                    self.handoff.labels(f"{STAGES[index - 1]}->{stage}").observe(t.fetch_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector(Collector):
    """Gauges and counters read from engine.stats() at scrape time."""

    def __init__(self, stats: Callable):
        self._stats = stats

    def collect(self):
        stats = self._stats()
        if stats is None:
            return
        queue = GaugeMetricFamily("dfuse_queue_depth", "Requests waiting in the engine's queue per stage",
                                  labels=["stage"])
        for stage, depth in stats.queues.items():
            queue.add_metric([stage], depth)
        workers = GaugeMetricFamily("dfuse_workers", "Worker processes per stage and device", labels=["stage", "device"])
        ready = GaugeMetricFamily("dfuse_workers_ready", "Workers ready to compute per stage and device",
                                  labels=["stage", "device"])
        counts, ready_counts = Counter(), Counter()
        for w in stats.workers:
            counts[w.stage, w.device] += 1
            ready_counts[w.stage, w.device] += w.ready
        for key, n in sorted(counts.items()):
            workers.add_metric(list(key), n)
            ready.add_metric(list(key), ready_counts[key])
        moves = CounterMetricFamily("dfuse_moves", "Workers moved between stages", labels=["reason"])
        for reason, n in sorted(Counter(m.reason for m in stats.moves).items()):
            moves.add_metric([reason], n)
        restarts = CounterMetricFamily("dfuse_worker_restarts", "Worker processes replaced after they died",
                                       labels=["stage"])
        per_stage = Counter()
        for w in stats.workers:
            per_stage[w.stage] += w.restarts
        for stage in [*STAGES, *(role for role in per_stage if role not in STAGES)]:  # and the fused role's
            restarts.add_metric([stage], per_stage[stage])
        engine = CounterMetricFamily("dfuse_engine_requests", "Images the engine finished, by outcome",
                                     labels=["outcome"])
        engine.add_metric(["completed"], stats.completed)
        engine.add_metric(["failed"], stats.failed)
        up = GaugeMetricFamily("dfuse_device_up", "1 while a device's node is in the cluster, 0 once it left "
                               "(always 1 on one host)", labels=["device"])
        for device in stats.devices:
            up.add_metric([device.name], 0 if device.name in stats.lost_devices else 1)
        yield from (queue, workers, ready, moves, restarts, engine, up)

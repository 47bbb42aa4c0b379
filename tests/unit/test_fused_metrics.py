"""Prometheus metrics of a fused worker's images: each stage's compute is counted, but no handoff
between stages that one process ran back to back (there was none), and a fused worker's restarts
are counted under its role; a device whose node left is down."""

from types import SimpleNamespace

from dfuse.engine.state import StageTiming
from dfuse.serve.metrics import Metrics

FUSED = "encoder+dit+decoder"


def _sample(metrics: Metrics, name: str, **labels) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_a_fused_image_counts_each_stage_and_no_handoff_a_split_one_counts_both_hops():
    stats = SimpleNamespace(queues={}, workers=[SimpleNamespace(stage=FUSED, device="cpu:0", ready=True, restarts=2)],
                            moves=[], completed=2, failed=0, devices=[SimpleNamespace(name="cpu:0")], lost_devices=[])
    metrics = Metrics(lambda: stats)
    fused = {s: StageTiming(worker_id=3, queued_s=0.0, compute_s=0.1, device="cpu:0", fused=True)
             for s in ("encoder", "dit", "decoder")}
    split = {s: StageTiming(worker_id=i, queued_s=0.0, compute_s=0.1, device="cpu:1", fetch_s=0.001)
             for i, s in enumerate(("encoder", "dit", "decoder"))}
    metrics.observe_images([fused, split])
    assert _sample(metrics, "dfuse_stage_compute_seconds_count", stage="dit", device="cpu:0") == 1
    assert _sample(metrics, "dfuse_handoff_seconds_count", link="encoder->dit") == 1  # the split image's hop only
    assert _sample(metrics, "dfuse_handoff_seconds_count", link="dit->decoder") == 1
    assert _sample(metrics, "dfuse_worker_restarts_total", stage=FUSED) == 2


def test_a_device_whose_node_left_the_cluster_is_down_and_the_others_up():
    stats = SimpleNamespace(queues={}, workers=[], moves=[], completed=0, failed=0,
                            devices=[SimpleNamespace(name="a/cpu:0"), SimpleNamespace(name="b/cpu:1")],
                            lost_devices=["b/cpu:1"])
    metrics = Metrics(lambda: stats)
    assert _sample(metrics, "dfuse_device_up", device="a/cpu:0") == 1
    assert _sample(metrics, "dfuse_device_up", device="b/cpu:1") == 0

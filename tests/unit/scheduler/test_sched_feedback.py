"""Feedback: per-instance corrections, rate and mix over a sliding window, gauges."""

import math

import pytest

from dfuse.scheduler.core import Shape
from dfuse.scheduler.feedback import Feedback, FeedbackConfig

A, B = Shape(512, 512, steps=4), Shape(1024, 1024, steps=28)


def test_correction_converges_to_the_observed_over_predicted_ratio():
    feedback = Feedback(FeedbackConfig(alpha=0.2))
    assert feedback.correction("w1") == 1.0 and feedback.correction("w1", default=1.3) == 1.3
    for i in range(60):
        feedback.observe("w1", "dit", predicted_s=2.0, observed_s=3.0 * (1.1 if i % 2 else 1 / 1.1), t=i, device_kind="l4")
        feedback.observe("w2", "dit", predicted_s=2.0, observed_s=2.0, t=i, device_kind="l4")
    assert feedback.correction("w1") == pytest.approx(1.5, rel=0.02)
    # Per (stage, kind): the geometric mean over its instances.
    assert feedback.corrections()[("dit", "l4")] == pytest.approx(math.sqrt(1.5), rel=0.02)
    feedback.forget("w1")
    assert feedback.corrections()[("dit", "l4")] == pytest.approx(1.0)


def test_rate_and_mix_over_the_sliding_window():
    feedback = Feedback(FeedbackConfig(window_s=100.0, min_window_arrivals=5))
    for i in range(200):  # 2 requests/s: A for 50 s, then B
        feedback.arrival(i * 0.5, A if i < 100 else B)
    stats = feedback.snapshot(100.0)
    assert stats.rate_rps == pytest.approx(2.0, rel=0.02)
    assert dict(stats.mix)[B] == pytest.approx(0.5, abs=0.02)
    stats = feedback.snapshot(160.0)  # the A requests have left the window
    assert dict(stats.mix) == {B: 1.0}
    assert dict(stats.in_system) == {A: 100, B: 100}
    for _ in range(100):
        feedback.finished(161.0, A)
    assert dict(feedback.snapshot(161.0).in_system) == {B: 100}


def test_window_stretches_back_at_low_rates():
    feedback = Feedback(FeedbackConfig(window_s=60.0, min_window_arrivals=10))
    for i in range(30):  # one request every 100 s
        feedback.arrival(100.0 * i, A)
    stats = feedback.snapshot(2950.0)
    assert stats.arrivals == 10
    assert stats.rate_rps == pytest.approx(0.01, rel=0.15)


def test_gauges_average_utilisation_over_their_window():
    feedback = Feedback(FeedbackConfig(utilization_window_s=10.0))
    for t in range(20):
        feedback.gauge(float(t), {"dit": t}, {"dit": 2 if t >= 10 else 0}, {"dit": 2})
    stats = feedback.snapshot(19.0)
    assert stats.utilization["dit"] == pytest.approx(1.0)
    assert stats.queue_depths["dit"] == 19

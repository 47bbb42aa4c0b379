"""Frames dropped from a peer that floods a socket are logged once in a while, counted in between."""

import logging

from dfuse.engine.transport.drop_log import DropLog


def test_a_flood_of_forged_frames_is_logged_once_per_interval_with_the_count(caplog):
    now = [0.0]
    drops = DropLog(logging.getLogger("dfuse.test.drops"), every_s=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="dfuse.test.drops"):
        for size in range(1000):
            drops.warning("dropped a frame without the engine's signature (%d bytes)", size)
            now[0] += 0.001
        drops.warning("dropped a malformed message (%d bytes): %s", 3, "bad")  # another kind: not held back
        now[0] = 20.0
        drops.warning("dropped a frame without the engine's signature (%d bytes)", 7)
    assert [r.getMessage() for r in caplog.records] == [
        "dropped a frame without the engine's signature (0 bytes)",
        "dropped a malformed message (3 bytes): bad",
        "dropped a frame without the engine's signature (7 bytes) (and 999 more like it in the last 20 s)",
    ]

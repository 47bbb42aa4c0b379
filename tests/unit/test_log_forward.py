"""A worker on another node forwards its warnings to the engine, bounded, as signed messages."""

import logging

from dfuse.engine import protocol as wire
from dfuse.stages.log_forward import KEPT, MAX_TEXT, LogForwarder


def test_warnings_and_errors_are_forwarded_in_order_and_info_is_not():
    forwarder = LogForwarder(worker_id=3)
    log = logging.getLogger("dfuse.test.forwarded")
    log.addHandler(forwarder)
    try:
        log.warning("could not open pool %s", "p1")
        log.info("loaded weights")  # below WARNING: stays on its node
        try:
            raise RuntimeError("CUDA error: an illegal memory access")
        except RuntimeError:
            log.exception("task failed")
    finally:
        log.removeHandler(forwarder)
    first, second = forwarder.take()
    assert first == wire.WorkerLog(3, logging.WARNING, "dfuse.test.forwarded: could not open pool p1")
    assert second.level == logging.ERROR and "illegal memory access" in second.text and "Traceback" in second.text
    assert forwarder.take() == []  # each record once
    # What the engine decodes is what was sent.
    assert wire.engine_decoder.decode(wire.encode(first)) == first


def _record(text: str) -> logging.LogRecord:
    return logging.LogRecord("dfuse.worker", logging.WARNING, __file__, 1, text, None, None)


def test_a_flood_is_bounded_and_counted_and_a_huge_record_keeps_its_head_and_its_last_line():
    forwarder = LogForwarder(worker_id=1)
    record = _record("Traceback (most recent call last):\n" + "x" * (10 * MAX_TEXT) + "\nRuntimeError: CUDA error")
    for _ in range(KEPT + 50):
        forwarder.handle(record)
    messages = forwarder.take()
    assert len(messages) == KEPT + 1
    for message in messages[:-1]:
        assert len(message.text) <= MAX_TEXT and "[...]" in message.text
        assert message.text.startswith("dfuse.worker: Traceback") and message.text.endswith("RuntimeError: CUDA error")
    assert messages[-1].text == f"50 more log records were not forwarded (over {KEPT} a second)"
    assert len(wire.encode(messages[0])) < 64 * 1024  # far under the engine's frame limit for other nodes


def test_text_msgpack_cannot_encode_is_escaped_not_lost():
    forwarder = LogForwarder(worker_id=1)
    forwarder.handle(_record("could not read /models/caf\udce9"))  # a file name decoded with surrogateescape
    (message,) = forwarder.take()
    assert wire.engine_decoder.decode(wire.encode(message)).text == "dfuse.worker: could not read /models/caf\\udce9"

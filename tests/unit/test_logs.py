"""Logs: a broker outage must not flood them; repeats are counted, not lost."""

from __future__ import annotations

import logging

import pytest

from dtx_runtime.logs import RepeatLimiter

pytestmark = pytest.mark.unit


def record(name: str, msg: str, level: int = logging.ERROR) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, (), None)


def test_repeats_within_the_window_are_counted_and_reported_after_it() -> None:
    now = [0.0]
    limiter = RepeatLimiter(("aiokafka",), window_s=10, clock=lambda: now[0])
    first = record("aiokafka.conn", "Unable connect to %s")
    assert limiter.filter(first)
    assert not hasattr(first, "suppressed")
    for _ in range(500):
        now[0] += 0.001
        assert not limiter.filter(record("aiokafka.conn", "Unable connect to %s"))
    # Another kind of message, or level, is not a repeat.
    assert limiter.filter(record("aiokafka.conn", "Metadata update failed"))
    assert limiter.filter(record("aiokafka.conn", "Unable connect to %s", logging.WARNING))
    now[0] = 10.0
    after = record("aiokafka.conn", "Unable connect to %s")
    assert limiter.filter(after)
    assert after.suppressed == 500  # type: ignore[attr-defined]
    now[0] = 20.0
    quiet = record("aiokafka.conn", "Unable connect to %s")
    assert limiter.filter(quiet)
    assert not hasattr(quiet, "suppressed")  # nothing was dropped in between


def test_other_loggers_are_never_limited() -> None:
    limiter = RepeatLimiter(("aiokafka",), clock=lambda: 0.0)
    for _ in range(100):
        assert limiter.filter(record("dtx_runtime.outbox.relay", "outbox publish failed"))

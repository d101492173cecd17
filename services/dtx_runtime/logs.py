"""Structured JSON logs that carry the current trace id.

One JSON object per line, so a log pipeline can index them, and ``trace_id``
on every record written inside a span, so a log line leads to its trace in
Tempo.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

from opentelemetry import trace
from pythonjsonlogger.json import JsonFormatter


class TraceContextFilter(logging.Filter):
    """Adds ``trace_id`` and ``span_id`` of the active span (empty outside one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            record.trace_id = format(context.trace_id, "032x")
            record.span_id = format(context.span_id, "016x")
        else:
            record.trace_id = ""
            record.span_id = ""
        return True


class RepeatLimiter(logging.Filter):
    """Lets one record per (logger, level, message template) through per window.

    Only records of the loggers under ``prefixes`` are limited (a handler
    filter: a logger's own filters never see its children's records).

    A client library retrying a lost broker in a tight loop (aiokafka logs an
    ERROR per failed metadata request and per connection attempt) writes
    thousands of identical lines a second: they hide everything else and cost
    the CPU the service needs. The first record of a kind passes; repeats
    within ``window_s`` are counted, not written, and the first one after the
    window carries ``suppressed`` (how many were dropped), so nothing is lost
    silently.
    """

    def __init__(
        self,
        prefixes: tuple[str, ...],
        window_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self._prefixes = prefixes
        self._window_s = window_s
        self._clock = clock
        self._seen: dict[tuple[str, int, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self._prefixes):
            return True
        key = (record.name, record.levelno, str(record.msg))
        now = self._clock()
        passed = self._seen.get(key)
        if passed is not None and now - passed[0] < self._window_s:
            self._seen[key] = (passed[0], passed[1] + 1)
            return False
        if passed is not None and passed[1]:
            record.suppressed = passed[1]
        if len(self._seen) >= 1000:  # bounded: forget the oldest kinds
            del self._seen[next(iter(self._seen))]
        self._seen[key] = (now, 0)
        return True


CHATTY_LIBRARIES = ("aiokafka",)
"""Loggers whose records are rate-limited by :class:`RepeatLimiter`."""


def configure_logging(service: str, level: str = "INFO") -> None:
    """Send JSON lines to stderr; idempotent, so tests may call it repeatedly."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s %(trace_id)s %(span_id)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            static_fields={"service": service},
        )
    )
    handler.addFilter(TraceContextFilter())
    handler.addFilter(RepeatLimiter(CHATTY_LIBRARIES))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    # aiokafka is chatty at INFO about routine reconnects, and repeats itself
    # at ERROR while a broker is away.
    for name in CHATTY_LIBRARIES:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))

"""Structured JSON logs that carry the current trace id.

One JSON object per line, so a log pipeline can index them, and ``trace_id``
on every record written inside a span, so a log line leads to its trace in
Tempo.
"""

from __future__ import annotations

import logging
import sys

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
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    # aiokafka and asyncpg are chatty at INFO about routine reconnects.
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, root.level))

"""The orchestrator's Prometheus metrics.

The per-transaction ones are the coordinator's own, imported (one registration,
the same names, ``protocol="saga"``), so a dashboard reads both protocols the
same way; only what is particular to sagas is defined here.
"""

from prometheus_client import Counter, Histogram

from dtx_runtime.coordination.metrics import (
    IN_DOUBT,
    IN_FLIGHT,
    NEEDS_INTERVENTION,
    OLDEST_UNFINISHED,
    PHASE_SECONDS,
    RETRIES,
    TRANSACTIONS,
)

PROTOCOL = "saga"

STEPS = Counter(
    "dtx_saga_steps_total",
    "Saga step calls that ended, by step, action (execute, compensate) and result"
    " (ok, refused, failed).",
    ["step", "action", "result"],
)
STEP_SECONDS = Histogram(
    "dtx_saga_step_seconds",
    "Time one saga step call took, retries included, by action.",
    ["action"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
COMPENSATIONS = Counter(
    "dtx_saga_compensations_total",
    "Sagas that turned back to compensate, by cause (refused, exhausted, deadline, aborted).",
    ["cause"],
)
PIVOT_STOOD = Counter(
    "dtx_saga_pivot_stood_total",
    "Sagas that turned back but completed: their pivot's effect was final, nothing undone yet.",
)

__all__ = [
    "COMPENSATIONS",
    "IN_DOUBT",
    "IN_FLIGHT",
    "NEEDS_INTERVENTION",
    "OLDEST_UNFINISHED",
    "PHASE_SECONDS",
    "PIVOT_STOOD",
    "PROTOCOL",
    "RETRIES",
    "STEPS",
    "STEP_SECONDS",
    "TRANSACTIONS",
]

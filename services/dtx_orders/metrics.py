"""Orders' Prometheus metrics (served on the side port's ``/metrics``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

ORDERS = Counter(
    "dtx_orders_total",
    "Orders placed, by protocol and the status PlaceOrder answered with"
    " (PENDING: the outcome was not known in time; the reconciler settles it).",
    ["protocol", "status"],
)
ORDER_SECONDS = Histogram(
    "dtx_order_seconds",
    "Time to place a new order, validation to answer, by protocol.",
    ["protocol"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
RECONCILED = Counter(
    "dtx_orders_reconciled_total",
    "PENDING orders the reconciler settled, by protocol and the status they got.",
    ["protocol", "status"],
)
RECONCILE_ERRORS = Counter(
    "dtx_orders_reconcile_errors_total",
    "Reconciler lookups or updates that failed (retried on the next pass).",
)
RECONCILE_WAITING = Gauge(
    "dtx_orders_reconcile_waiting",
    "PENDING orders past the reconcile age that the last reconciler pass left PENDING"
    " (transaction undecided, saga unknown to the orchestrator, or a lookup failed).",
)

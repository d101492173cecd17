"""Transaction metrics of both drivers, told apart by the ``protocol`` label (2pc, saga)."""

from prometheus_client import Counter, Gauge, Histogram

TRANSACTIONS = Counter(
    "dtx_transactions_total",
    "Global transactions that ended, by protocol and outcome.",
    ["protocol", "outcome"],
)
PHASE_SECONDS = Histogram(
    "dtx_transaction_phase_seconds",
    "Time spent per phase of a global transaction.",
    ["protocol", "phase"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
RETRIES = Counter(
    "dtx_transaction_retries_total",
    "Calls to a participant that were retried, by protocol and action.",
    ["protocol", "action"],
)
IN_FLIGHT = Gauge(
    "dtx_transactions_in_flight", "Transactions this process is running now.", ["protocol"]
)
IN_DOUBT = Gauge(
    "dtx_transactions_in_doubt",
    "Unfinished transactions older than the policy's in-doubt threshold.",
    ["protocol"],
)
NEEDS_INTERVENTION = Gauge(
    "dtx_transactions_needs_intervention",
    "Transactions parked for a person after their retries ran out.",
    ["protocol"],
)
OLDEST_UNFINISHED = Gauge(
    "dtx_transaction_oldest_unfinished_age_seconds",
    "Age of the oldest transaction that has not finished (0 when none).",
    ["protocol"],
)

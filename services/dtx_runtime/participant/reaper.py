"""The participant's reaper: settle prepared transactions left in doubt.

A participant that voted yes must not decide alone. When its prepared
transaction is older than a threshold (the coordinator died, a Commit was
lost), the reaper asks the coordinator for the outcome and applies it. There
is no time after which a prepared transaction is forgotten or decided
locally: undecided ones stay prepared and are asked about again next round.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta

import asyncpg
from prometheus_client import Counter, Gauge

from dtx.v1 import transactions_pb2
from dtx_runtime.identifiers import PREPARED_PREFIX, parse_prepared_name
from dtx_runtime.participant.barrier import Barrier

log = logging.getLogger(__name__)

IN_DOUBT = Gauge(
    "dtx_participant_in_doubt_transactions",
    "Prepared transactions older than the reaper threshold whose outcome is still unknown.",
)
RESOLVED = Counter(
    "dtx_participant_reaped_total",
    "Prepared transactions the reaper settled, by outcome.",
    ["outcome"],
)

OutcomeLookup = Callable[[str], Awaitable["transactions_pb2.Outcome.ValueType"]]


@dataclass(frozen=True)
class ReapReport:
    committed: int = 0
    aborted: int = 0
    undecided: int = 0
    failed: int = 0


async def reap_once(
    pool: asyncpg.Pool,
    barrier: Barrier,
    outcome_of: OutcomeLookup,
    *,
    older_than: timedelta,
    lookup_timeout_s: float = 5.0,
) -> ReapReport:
    """One pass over this database's dtx prepared transactions older than ``older_than``."""
    async with pool.acquire() as conn:
        names = await conn.fetch(
            "SELECT gid FROM pg_prepared_xacts WHERE database = current_database()"
            " AND starts_with(gid, $1) AND prepared < now() - $2::interval ORDER BY prepared",
            PREPARED_PREFIX,
            older_than,
        )
    committed = aborted = undecided = failed = 0
    for record in names:
        parsed = parse_prepared_name(record["gid"])
        if parsed is None:
            continue
        gid, branch = parsed
        try:
            outcome = await asyncio.wait_for(outcome_of(gid), lookup_timeout_s)
            if outcome == transactions_pb2.OUTCOME_COMMITTED:
                await barrier.commit(gid, branch)
                committed += 1
                RESOLVED.labels("committed").inc()
            elif outcome == transactions_pb2.OUTCOME_ABORTED:
                await barrier.abort(gid, branch)
                aborted += 1
                RESOLVED.labels("aborted").inc()
            else:
                undecided += 1
        except Exception as exc:
            failed += 1
            log.warning("reaper could not settle %s: %s", record["gid"], exc)
    IN_DOUBT.set(undecided + failed)
    return ReapReport(committed, aborted, undecided, failed)


async def run_reaper(
    pool: asyncpg.Pool,
    barrier: Barrier,
    outcome_of: OutcomeLookup,
    *,
    interval_s: float,
    older_than: timedelta,
    retention: timedelta,
) -> None:
    """Reap forever at ``interval_s``; also trims barrier rows past retention."""
    while True:
        try:
            report = await reap_once(pool, barrier, outcome_of, older_than=older_than)
            if report.committed or report.aborted or report.failed:
                log.info("reaper pass", extra=report.__dict__)
            await barrier.delete_older_than(retention)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("reaper pass failed: %s", exc)
        await asyncio.sleep(interval_s)

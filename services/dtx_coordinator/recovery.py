"""The recovery loop: claim unfinished transactions with leases and drive them home.

Every replica runs it; ``FOR UPDATE SKIP LOCKED`` plus a lease in the row
means two replicas never drive the same transaction at once, and a dead
replica's work is taken over when its lease runs out (at once for a restarted
process, which recognises its own earlier incarnation). There is no window
after which an unfinished transaction is forgotten: it is driven until it
finishes or is parked for a person.
"""

from __future__ import annotations

import asyncio
import logging

from dtx_coordinator.engine import PROTOCOL, Engine
from dtx_runtime.coordination import metrics

log = logging.getLogger(__name__)

BATCH = 64
CONCURRENCY = 16


async def recover_once(engine: Engine, *, replica_prefix: str) -> int:
    """One pass; returns how many transactions it drove."""
    policy = engine.policy.current
    claimed = await engine.log.claim(
        owner=engine.owner,
        replica_prefix=replica_prefix,
        lease_ms=max(10_000, 4 * policy.timeouts.commit_ms),
        limit=BATCH,
        exclude=sorted(engine.local),
    )
    gate = asyncio.Semaphore(CONCURRENCY)

    async def drive(txn_index: int) -> None:
        async with gate:
            try:
                await engine.drive(claimed[txn_index])
            except Exception:
                log.exception(
                    "recovery of %s failed; it will be claimed again", claimed[txn_index].gid
                )

    await asyncio.gather(*(drive(i) for i in range(len(claimed))))
    summary = await engine.log.summary(policy.recovery.in_doubt_threshold_ms)
    metrics.IN_DOUBT.labels(PROTOCOL).set(summary.in_doubt)
    metrics.NEEDS_INTERVENTION.labels(PROTOCOL).set(summary.parked)
    metrics.OLDEST_UNFINISHED.labels(PROTOCOL).set(summary.oldest_unfinished_age_s)
    return len(claimed)


async def run_recovery(engine: Engine, *, replica_prefix: str) -> None:
    """Forever: a pass at once (start-up recovery), then one per policy interval."""
    while True:
        try:
            driven = await recover_once(engine, replica_prefix=replica_prefix)
            if driven:
                log.info("recovered %d transactions", driven)
                if driven == BATCH:
                    continue  # more are due: no sleep
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("recovery pass failed: %s", exc)
        await asyncio.sleep(engine.policy.current.recovery.interval_ms / 1000)

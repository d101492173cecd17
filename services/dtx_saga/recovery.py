"""The recovery loop: claim unfinished sagas with leases and drive them home.

The coordinator's mechanics, for sagas: every replica runs it; ``FOR UPDATE
SKIP LOCKED`` plus a lease in the row means two replicas never drive the same
saga at once, and a dead replica's sagas are taken over when its leases run
out (at once for a restarted process, which recognises its own earlier
incarnation by the replica prefix of the lease owner). A pass runs at start-up
and then every ``recovery.intervalMs``.

A RUNNING saga continues forward from its first step not done, a COMPENSATING
one continues compensating, a RUNNING one past its deadline turns back. Each
claimed saga gets one round per pass; what is left is rescheduled with a
backoff and, after ``recovery.maxAttempts`` rounds, turned back or parked
(see ``engine``). Nothing unfinished is ever forgotten.
"""

from __future__ import annotations

import asyncio
import logging

from dtx_saga import metrics
from dtx_saga.engine import Engine
from dtx_saga.metrics import PROTOCOL

log = logging.getLogger(__name__)

BATCH = 64
CONCURRENCY = 16


async def recover_once(engine: Engine, *, replica_prefix: str) -> int:
    """One pass; returns how many sagas it drove."""
    policy = engine.policy.current
    claimed = await engine.log.claim(
        owner=engine.owner,
        replica_prefix=replica_prefix,
        lease_ms=engine.lease_ms(policy),
        limit=BATCH,
        exclude=sorted(engine.local),
    )
    gate = asyncio.Semaphore(CONCURRENCY)

    async def drive(index: int) -> None:
        async with gate:
            try:
                await engine.drive(claimed[index])
            except Exception:
                log.exception(
                    "recovery of saga %s failed; it will be claimed again", claimed[index].gid
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
                log.info("recovered %d sagas", driven)
                if driven == BATCH:
                    continue  # more are due: no sleep
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("recovery pass failed: %s", exc)
        await asyncio.sleep(engine.policy.current.recovery.interval_ms / 1000)

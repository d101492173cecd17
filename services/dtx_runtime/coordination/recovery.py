"""The recovery loop both drivers run: claim due work with leases, drive it home.

Every replica runs it; ``FOR UPDATE SKIP LOCKED`` plus a lease in the row
means two replicas never drive the same transaction at once, and a dead
replica's work is taken over when its lease runs out (at once for a
restarted process, which recognises its own earlier incarnation by the
replica prefix of the lease owner). A pass runs at start-up and then every
``recovery.intervalMs``; a full batch is followed by another pass at once.
Nothing unfinished is ever forgotten: it is driven until it ends or is parked.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Protocol, TypeVar

import asyncpg

from dtx_runtime.coordination import metrics
from dtx_runtime.policy import PolicyHolder, TransactionPolicy

log = logging.getLogger(__name__)

BATCH = 64
CONCURRENCY = 16


class HasGid(Protocol):
    @property
    def gid(self) -> str: ...


Item = TypeVar("Item", bound=HasGid)
ItemT = TypeVar("ItemT", bound=HasGid, covariant=True)


class Summary(Protocol):
    @property
    def in_doubt(self) -> int: ...
    @property
    def parked(self) -> int: ...
    @property
    def oldest_unfinished_age_s(self) -> float: ...


class Log(Protocol[ItemT]):
    async def claim(
        self, *, owner: str, replica_prefix: str, lease_ms: int, limit: int, exclude: Sequence[str]
    ) -> Sequence[ItemT]: ...

    async def summary(self, in_doubt_after_ms: int) -> Summary: ...


class Driver(Protocol[Item]):
    owner: str
    local: set[str]
    policy: PolicyHolder

    @property
    def log(self) -> Log[Item]: ...

    def lease_ms(self, policy: TransactionPolicy) -> int: ...

    async def drive(self, item: Item, /) -> object: ...


async def claim_due(
    pool: asyncpg.Pool,
    *,
    table: str,
    unfinished: Sequence[str],
    columns: str,
    owner: str,
    replica_prefix: str,
    lease_ms: int,
    limit: int,
    exclude: Sequence[str],
) -> list[asyncpg.Record]:
    """Lease the due, unfinished rows of ``table`` not held by a live driver.

    ``table`` and ``columns`` are the caller's constants, never input.
    """
    rows: list[asyncpg.Record] = await pool.fetch(
        f"UPDATE {table} SET lease_owner = $1, updated_at = now(),"
        f" lease_expires = now() + make_interval(secs => $2::float8 / 1000)"
        f" WHERE gid IN (SELECT gid FROM {table}"
        f"  WHERE state = ANY($6::text[])"
        f"    AND next_attempt_at <= now()"
        f"    AND (lease_expires IS NULL OR lease_expires < now()"
        f"         OR (starts_with(lease_owner, $3) AND lease_owner <> $1))"
        f"    AND NOT (gid = ANY($4::text[]))"
        f"  ORDER BY next_attempt_at LIMIT $5 FOR UPDATE SKIP LOCKED)"
        f" RETURNING {columns}",
        owner,
        lease_ms,
        replica_prefix,
        list(exclude),
        limit,
        list(unfinished),
    )
    return rows


async def recover_once(driver: Driver[Item], *, protocol: str, replica_prefix: str) -> int:
    """One pass; returns how many it drove."""
    policy = driver.policy.current
    claimed = await driver.log.claim(
        owner=driver.owner,
        replica_prefix=replica_prefix,
        lease_ms=driver.lease_ms(policy),
        limit=BATCH,
        exclude=sorted(driver.local),
    )
    gate = asyncio.Semaphore(CONCURRENCY)

    async def drive(item: Item) -> None:
        async with gate:
            try:
                await driver.drive(item)
            except Exception:
                log.exception("recovery of %s failed; it will be claimed again", item.gid)

    await asyncio.gather(*(drive(item) for item in claimed))
    summary = await driver.log.summary(policy.recovery.in_doubt_threshold_ms)
    metrics.IN_DOUBT.labels(protocol).set(summary.in_doubt)
    metrics.NEEDS_INTERVENTION.labels(protocol).set(summary.parked)
    metrics.OLDEST_UNFINISHED.labels(protocol).set(summary.oldest_unfinished_age_s)
    return len(claimed)


async def run_recovery(driver: Driver[Item], *, protocol: str, replica_prefix: str) -> None:
    """Forever: a pass at once (start-up recovery), then one per policy interval."""
    while True:
        try:
            driven = await recover_once(driver, protocol=protocol, replica_prefix=replica_prefix)
            if driven:
                log.info("recovered %d %s transactions", driven, protocol)
                if driven == BATCH:
                    continue  # more are due: no sleep
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("recovery pass failed: %s", exc)
        await asyncio.sleep(driver.policy.current.recovery.interval_ms / 1000)

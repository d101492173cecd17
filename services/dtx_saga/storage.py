"""The saga log's SQL.

Two pools, as in the coordinator, but the durable writes are different ones,
because a saga has no presumed outcome to fall back on:

* the **begin** record is durable: steps are about to change other databases,
  and a saga lost from the log would leave their effects with nobody to
  compensate them;
* **turning back** (RUNNING → COMPENSATING) is durable before any Compensate
  goes out: were it lost, a recovering orchestrator would resume forward and
  count an already compensated step as done (its barrier row still says done);
* **COMPLETED** is durable before RunSaga answers it: were it lost, recovery
  could find the saga past its deadline and compensate what a caller was told
  had completed;
* interventions and the AbortSaga tombstone are durable (a person was told).

Everything else — a step's result, a compensated step, COMPENSATED, a
reschedule, a park — goes through the *lazy* pool (``synchronous_commit=off``):
losing it in a database crash only makes recovery repeat a call the barrier
makes idempotent. WAL is written in order, so a durable write also flushes
the lazy ones before it. Several steps' results can be lost at once, though,
so every saga read from here is marked ``may_lag``: should it turn back, the
steps it shows pending are compensated too (``domain.begin_compensation``).

Every write of a driver is fenced by ``lease_owner``: a driver whose lease
was taken over (by a replica, or by an intervention, which clears it) has its
next write refused and stops, instead of overwriting the new owner's state.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import asyncpg

from dtx_runtime.coordination.records import Attempt
from dtx_runtime.coordination.recovery import claim_due
from dtx_saga.domain import Direction, Saga, State, StepRecord, cursor

_COLUMNS = (
    "gid, state, direction, steps, reason, parked_reason, attempts, timeout_ms, deadline,"
    " lease_owner, created_at, updated_at, finished_at,"
    " GREATEST(EXTRACT(EPOCH FROM deadline - now()), 0)::float8 AS remaining_s"
)

UNFINISHED_STATES = ("RUNNING", "COMPENSATING")
_UNFINISHED = "('RUNNING', 'COMPENSATING')"


@dataclass(frozen=True)
class LogSummary:
    in_doubt: int
    parked: int
    oldest_unfinished_age_s: float


def _encode(steps: Sequence[StepRecord]) -> str:
    return json.dumps([s.to_json() for s in steps])


def _row(record: asyncpg.Record) -> Saga:
    saga = Saga(
        gid=record["gid"],
        state=State(record["state"]),
        steps=[StepRecord.from_json(s) for s in json.loads(record["steps"])],
        direction=Direction(record["direction"]),
        reason=record["reason"],
        parked_reason=record["parked_reason"],
        attempts=record["attempts"],
        timeout_ms=record["timeout_ms"],
        remaining_s=record["remaining_s"],
        may_lag=True,
    )
    saga.extra = {
        k: record[k] for k in ("deadline", "lease_owner", "created_at", "updated_at", "finished_at")
    }
    return saga


class SagaLog:
    def __init__(self, durable: asyncpg.Pool, lazy: asyncpg.Pool) -> None:
        self.durable = durable
        self.lazy = lazy

    async def begin(
        self, gid: str, steps: Sequence[StepRecord], *, timeout_ms: int, owner: str, lease_ms: int
    ) -> bool:
        """Log a new saga as RUNNING (durably); False when the gid is already known."""
        inserted = await self.durable.fetchval(
            "INSERT INTO sagas (gid, state, steps, timeout_ms, deadline, lease_owner, lease_expires)"
            " VALUES ($1, 'RUNNING', $2::jsonb, $3::integer,"
            "         now() + make_interval(secs => $3::integer::float8 / 1000),"
            "         $4, now() + make_interval(secs => $5::float8 / 1000))"
            " ON CONFLICT (gid) DO NOTHING RETURNING true",
            gid,
            _encode(steps),
            timeout_ms,
            owner,
            lease_ms,
        )
        return bool(inserted)

    async def save(self, saga: Saga, *, owner: str, lease_ms: int, durable: bool = False) -> bool:
        """Write the saga's progress and extend the lease; False when the lease was lost."""
        pool = self.durable if durable else self.lazy
        saved = await pool.fetchval(
            "UPDATE sagas SET state = $3, direction = $4, steps = $5::jsonb, current_step = $6,"
            " reason = $7, parked_reason = $8, attempts = $9, updated_at = now(),"
            " lease_expires = now() + make_interval(secs => $10::float8 / 1000)"
            " WHERE gid = $1 AND lease_owner = $2 RETURNING true",
            saga.gid,
            owner,
            saga.state.value,
            saga.direction.value,
            _encode(saga.steps),
            cursor(saga),
            saga.reason,
            saga.parked_reason,
            saga.attempts,
            lease_ms,
        )
        return bool(saved)

    async def release(
        self, saga: Saga, *, owner: str, delay_ms: int = 0, durable: bool = False
    ) -> bool:
        """Write the saga and give up its lease: finished, parked, or due again after ``delay_ms``."""
        pool = self.durable if durable else self.lazy
        released = await pool.fetchval(
            "UPDATE sagas SET state = $3, direction = $4, steps = $5::jsonb, current_step = $6,"
            " reason = $7, parked_reason = $8, attempts = $9, updated_at = now(),"
            " next_attempt_at = now() + make_interval(secs => $10::float8 / 1000),"
            " finished_at = CASE WHEN $3 IN ('COMPLETED', 'COMPENSATED') THEN now() END,"
            " lease_owner = NULL, lease_expires = NULL"
            " WHERE gid = $1 AND lease_owner = $2 RETURNING true",
            saga.gid,
            owner,
            saga.state.value,
            saga.direction.value,
            _encode(saga.steps),
            cursor(saga),
            saga.reason,
            saga.parked_reason,
            saga.attempts,
            delay_ms,
        )
        return bool(released)

    async def claim(
        self, *, owner: str, replica_prefix: str, lease_ms: int, limit: int, exclude: Sequence[str]
    ) -> list[Saga]:
        """Lease unfinished sagas that are due and not held by a live driver.

        A lease held by an earlier incarnation of this same replica (same
        prefix, other owner) is taken at once: that process is gone.
        """
        rows = await claim_due(
            self.lazy,
            table="sagas",
            unfinished=UNFINISHED_STATES,
            columns=_COLUMNS,
            owner=owner,
            replica_prefix=replica_prefix,
            lease_ms=lease_ms,
            limit=limit,
            exclude=exclude,
        )
        return [_row(r) for r in rows]

    async def release_leases(self, owner: str) -> int:
        """Give back every lease ``owner`` holds (a clean shutdown); returns how many."""
        result: str = await self.lazy.execute(
            "UPDATE sagas SET lease_owner = NULL, lease_expires = NULL WHERE lease_owner = $1",
            owner,
        )
        return int(result.split()[-1])

    async def get(self, gid: str) -> Saga | None:
        row = await self.lazy.fetchrow(f"SELECT {_COLUMNS} FROM sagas WHERE gid = $1", gid)
        return _row(row) if row else None

    async def list_by_state(self, states: Sequence[State], limit: int) -> list[Saga]:
        rows = await self.lazy.fetch(
            f"SELECT {_COLUMNS} FROM sagas WHERE state = ANY($1::text[])"
            " ORDER BY created_at DESC LIMIT $2",
            [s.value for s in states],
            limit,
        )
        return [_row(r) for r in rows]

    async def record_attempts(self, attempts: Sequence[Attempt]) -> None:
        if attempts:
            await self.lazy.executemany(
                "INSERT INTO saga_attempts (gid, step, action, attempt, result, detail)"
                " VALUES ($1, $2, $3, $4, $5, $6)",
                [
                    (a.gid, a.branch, a.action, a.attempt, a.result, a.detail[:2000])
                    for a in attempts
                ],
            )

    async def attempts(self, gid: str) -> list[Attempt]:
        rows = await self.lazy.fetch(
            "SELECT gid, step AS branch, action, attempt, result, detail, at FROM saga_attempts"
            " WHERE gid = $1 ORDER BY id",
            gid,
        )
        return [Attempt(**dict(r)) for r in rows]

    async def intervene(
        self, gid: str, action: str, actor: str, reason: str, change: Callable[[Saga], bool]
    ) -> tuple[Saga, bool] | None:
        """Apply ``change`` to the saga under a row lock, with an audit row when it changed.

        Returns the saga as it is afterwards and whether it changed, or None
        for an unknown gid. The
        lease is cleared, so a driver still at work has its next write refused.
        A forward saga gets a fresh deadline (its own timeout from now): a
        retry after the deadline would otherwise turn back at once.
        """
        async with self.durable.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"SELECT {_COLUMNS} FROM sagas WHERE gid = $1 FOR UPDATE", gid
            )
            if row is None:
                return None
            saga = _row(row)
            before = saga.state
            if not change(saga):
                return saga, False
            await conn.execute(
                "UPDATE sagas SET state = $2, direction = $3, steps = $4::jsonb, current_step = $5,"
                " reason = $6, parked_reason = $7, attempts = $8, updated_at = now(),"
                " deadline = CASE WHEN $3 = 'forward'"
                "   THEN now() + make_interval(secs => timeout_ms::float8 / 1000) ELSE deadline END,"
                " next_attempt_at = now(), lease_owner = NULL, lease_expires = NULL"
                " WHERE gid = $1",
                gid,
                saga.state.value,
                saga.direction.value,
                _encode(saga.steps),
                cursor(saga),
                saga.reason,
                saga.parked_reason,
                saga.attempts,
            )
            await conn.execute(
                "INSERT INTO interventions (gid, action, actor, reason, from_state, to_state)"
                " VALUES ($1, $2, $3, $4, $5, $6)",
                gid,
                action,
                actor,
                reason,
                before.value,
                saga.state.value,
            )
        after = await self.get(gid)
        assert after is not None
        return after, True

    async def tombstone(self, saga: Saga, actor: str, reason: str) -> bool:
        """Record an aborted unknown gid as COMPENSATED; False when the gid appeared meanwhile."""
        async with self.durable.acquire() as conn, conn.transaction():
            inserted = await conn.fetchval(
                "INSERT INTO sagas (gid, state, direction, steps, current_step, reason,"
                "                   timeout_ms, deadline, finished_at)"
                " VALUES ($1, $2, $3, '[]', -1, $4, 0, now(), now())"
                " ON CONFLICT (gid) DO NOTHING RETURNING true",
                saga.gid,
                saga.state.value,
                saga.direction.value,
                saga.reason,
            )
            if not inserted:
                return False
            await conn.execute(
                "INSERT INTO interventions (gid, action, actor, reason, from_state, to_state)"
                " VALUES ($1, 'abort', $2, $3, 'UNKNOWN', $4)",
                saga.gid,
                actor,
                reason,
                saga.state.value,
            )
        return True

    async def interventions(self, gid: str) -> list[asyncpg.Record]:
        return list(
            await self.lazy.fetch(
                "SELECT action, actor, reason, from_state, to_state, at FROM interventions"
                " WHERE gid = $1 ORDER BY id",
                gid,
            )
        )

    async def summary(self, in_doubt_after_ms: int) -> LogSummary:
        row = await self.lazy.fetchrow(
            "SELECT count(*) FILTER (WHERE state <> 'NEEDS_INTERVENTION' AND"
            "        created_at < now() - make_interval(secs => $1::float8 / 1000)) AS in_doubt,"
            "       count(*) FILTER (WHERE state = 'NEEDS_INTERVENTION') AS parked,"
            "       COALESCE(EXTRACT(EPOCH FROM now() - min(created_at)), 0)::float8 AS oldest"
            " FROM sagas WHERE state IN ('RUNNING', 'COMPENSATING', 'NEEDS_INTERVENTION')",
            in_doubt_after_ms,
        )
        assert row is not None
        return LogSummary(row["in_doubt"], row["parked"], row["oldest"])

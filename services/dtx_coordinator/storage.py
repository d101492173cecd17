"""The transaction log's SQL.

Two pools on purpose. Only the commit decision must be on disk before anyone
acts on it, so it goes through the *durable* pool (``synchronous_commit=on``).
Everything else goes through the *lazy* pool (``synchronous_commit=off``):
the begin record, an abort decision and the final state may be lost in a
database crash without harm, because a missing decision means abort and a
lost final state only makes recovery repeat an idempotent phase two. WAL is
written in order, so flushing a decision also flushes what came before it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from dtx_coordinator.domain import BranchRecord, Decision, GlobalTransaction, State
from dtx_runtime.coordination.records import Attempt
from dtx_runtime.coordination.recovery import claim_due

UNFINISHED_STATES = ("PREPARING", "COMMITTING", "ABORTING")
_COLUMNS = (
    "gid, state, decision, reason, branches, attempts, deadline, lease_owner,"
    " created_at, updated_at, decided_at, finished_at"
)


@dataclass(frozen=True)
class LogSummary:
    in_doubt: int
    parked: int
    oldest_unfinished_age_s: float


def _encode(branches: Sequence[BranchRecord]) -> str:
    return json.dumps([b.to_json() for b in branches])


def _row(record: asyncpg.Record) -> GlobalTransaction:
    txn = GlobalTransaction(
        gid=record["gid"],
        state=State(record["state"]),
        decision=Decision(record["decision"]) if record["decision"] else None,
        branches=[BranchRecord.from_json(b) for b in json.loads(record["branches"])],
        reason=record["reason"],
        attempts=record["attempts"],
    )
    txn.extra = {
        k: record[k]
        for k in (
            "deadline",
            "lease_owner",
            "created_at",
            "updated_at",
            "decided_at",
            "finished_at",
        )
    }
    return txn


class TransactionLog:
    def __init__(self, durable: asyncpg.Pool, lazy: asyncpg.Pool) -> None:
        self.durable = durable
        self.lazy = lazy

    async def begin(
        self,
        gid: str,
        branches: Sequence[BranchRecord],
        *,
        timeout_ms: int,
        owner: str,
        lease_ms: int,
    ) -> bool:
        """Log a new transaction as PREPARING; False when the gid is already known."""
        inserted = await self.lazy.fetchval(
            "INSERT INTO global_transactions"
            " (gid, state, branches, deadline, lease_owner, lease_expires)"
            " VALUES ($1, 'PREPARING', $2::jsonb, now() + make_interval(secs => $3::float8 / 1000),"
            "         $4, now() + make_interval(secs => $5::float8 / 1000))"
            " ON CONFLICT (gid) DO NOTHING RETURNING true",
            gid,
            _encode(branches),
            timeout_ms,
            owner,
            lease_ms,
        )
        return bool(inserted)

    async def decide(
        self,
        gid: str,
        decision: Decision,
        reason: str,
        branches: Sequence[BranchRecord],
        *,
        lease_ms: int,
    ) -> bool:
        """Log the decision unless one is logged already; True when this call decided.

        A commit goes through the durable pool: it must be on disk before any
        participant is told to commit.
        """
        pool = self.durable if decision is Decision.COMMIT else self.lazy
        state = State.COMMITTING if decision is Decision.COMMIT else State.ABORTING
        decided = await pool.fetchval(
            "UPDATE global_transactions SET state = $2, decision = $3, reason = $4,"
            " branches = $5::jsonb, decided_at = now(), updated_at = now(),"
            " lease_expires = now() + make_interval(secs => $6::float8 / 1000)"
            " WHERE gid = $1 AND decision IS NULL AND state = 'PREPARING' RETURNING true",
            gid,
            state.value,
            decision.value,
            reason,
            _encode(branches),
            lease_ms,
        )
        return bool(decided)

    async def finish(self, gid: str, state: State, branches: Sequence[BranchRecord]) -> None:
        await self.lazy.execute(
            "UPDATE global_transactions SET state = $2, branches = $3::jsonb, updated_at = now(),"
            " finished_at = now(), lease_owner = NULL, lease_expires = NULL"
            " WHERE gid = $1 AND state IN ('COMMITTING', 'ABORTING')",
            gid,
            state.value,
            _encode(branches),
        )

    async def reschedule(
        self,
        gid: str,
        branches: Sequence[BranchRecord],
        *,
        attempts: int,
        delay_ms: int,
        park_reason: str | None,
    ) -> None:
        """After a round with unsettled branches: retry later, or park for a person.

        Like :meth:`finish`, only for a transaction still being driven: a
        replica that raced another to the same phase two cannot undo its end.
        """
        await self.lazy.execute(
            "UPDATE global_transactions SET branches = $2::jsonb, attempts = $3,"
            " next_attempt_at = now() + make_interval(secs => $4::float8 / 1000),"
            " state = CASE WHEN $5::text IS NULL THEN state ELSE 'NEEDS_INTERVENTION' END,"
            " reason = COALESCE($5::text, reason), updated_at = now(),"
            " lease_owner = NULL, lease_expires = NULL"
            " WHERE gid = $1 AND state IN ('COMMITTING', 'ABORTING')",
            gid,
            _encode(branches),
            attempts,
            delay_ms,
            park_reason,
        )

    async def claim(
        self, *, owner: str, replica_prefix: str, lease_ms: int, limit: int, exclude: Sequence[str]
    ) -> list[GlobalTransaction]:
        """Lease unfinished transactions that are due and not held by a live driver.

        A lease held by an earlier incarnation of this same replica (same
        prefix, other owner) is taken at once: that process is gone.
        """
        rows = await claim_due(
            self.lazy,
            table="global_transactions",
            unfinished=UNFINISHED_STATES,
            columns=_COLUMNS,
            owner=owner,
            replica_prefix=replica_prefix,
            lease_ms=lease_ms,
            limit=limit,
            exclude=exclude,
        )
        return [_row(r) for r in rows]

    async def get(self, gid: str) -> GlobalTransaction | None:
        row = await self.lazy.fetchrow(
            f"SELECT {_COLUMNS} FROM global_transactions WHERE gid = $1", gid
        )
        return _row(row) if row else None

    async def list_by_state(self, states: Sequence[State], limit: int) -> list[GlobalTransaction]:
        rows = await self.lazy.fetch(
            f"SELECT {_COLUMNS} FROM global_transactions WHERE state = ANY($1::text[])"
            " ORDER BY created_at DESC LIMIT $2",
            [s.value for s in states],
            limit,
        )
        return [_row(r) for r in rows]

    async def presume_abort(self, gid: str) -> None:
        """Record an unknown gid as aborted, so a late RunTransaction of it cannot commit."""
        await self.durable.execute(
            "INSERT INTO global_transactions"
            " (gid, state, decision, reason, branches, deadline, decided_at, finished_at)"
            " VALUES ($1, 'ABORTED', 'abort', 'presumed abort: unknown when asked', '[]',"
            "         now(), now(), now())"
            " ON CONFLICT (gid) DO NOTHING",
            gid,
        )

    async def record_attempts(self, attempts: Sequence[Attempt]) -> None:
        if attempts:
            await self.lazy.executemany(
                "INSERT INTO branch_attempts (gid, branch, action, attempt, result, detail)"
                " VALUES ($1, $2, $3, $4, $5, $6)",
                [
                    (a.gid, a.branch, a.action, a.attempt, a.result, a.detail[:2000])
                    for a in attempts
                ],
            )

    async def attempts(self, gid: str) -> list[Attempt]:
        rows = await self.lazy.fetch(
            "SELECT gid, branch, action, attempt, result, detail, at FROM branch_attempts"
            " WHERE gid = $1 ORDER BY id",
            gid,
        )
        return [Attempt(**dict(r)) for r in rows]

    async def intervene(
        self,
        gid: str,
        action: str,
        actor: str,
        reason: str,
        *,
        new_state: State,
        decision: Decision,
    ) -> None:
        """Re-open a parked transaction (retry) or abort an undecided one, with an audit row."""
        async with self.durable.acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE global_transactions SET state = $2, decision = $3, attempts = 0,"
                " next_attempt_at = now(), lease_owner = NULL, lease_expires = NULL,"
                " decided_at = COALESCE(decided_at, now()), updated_at = now() WHERE gid = $1",
                gid,
                new_state.value,
                decision.value,
            )
            await conn.execute(
                "INSERT INTO interventions (gid, action, actor, reason) VALUES ($1, $2, $3, $4)",
                gid,
                action,
                actor,
                reason,
            )

    async def summary(self, in_doubt_after_ms: int) -> LogSummary:
        row = await self.lazy.fetchrow(
            "SELECT count(*) FILTER (WHERE state <> 'NEEDS_INTERVENTION' AND"
            "        created_at < now() - make_interval(secs => $1::float8 / 1000)) AS in_doubt,"
            "       count(*) FILTER (WHERE state = 'NEEDS_INTERVENTION') AS parked,"
            "       COALESCE(EXTRACT(EPOCH FROM now() - min(created_at)), 0)::float8 AS oldest"
            " FROM global_transactions"
            " WHERE state IN ('PREPARING', 'COMMITTING', 'ABORTING', 'NEEDS_INTERVENTION')",
            in_doubt_after_ms,
        )
        assert row is not None
        return LogSummary(row["in_doubt"], row["parked"], row["oldest"])

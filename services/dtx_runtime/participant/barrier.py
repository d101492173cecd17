"""The barrier: every participant call idempotent and safe out of order.

Two-phase commit (PostgreSQL's own ``PREPARE TRANSACTION``):

* ``prepare`` inserts the row ``(gid, branch, 'prepare', 'prepared')`` and does
  the work in one local transaction, then prepares it. The row only becomes
  visible with ``COMMIT PREPARED``, so afterwards it is the proof that the
  branch committed; ``ROLLBACK PREPARED`` takes it away.
* ``abort`` rolls the prepared transaction back (when there is one) and then
  commits a tombstone ``(gid, branch, 'prepare', 'aborted')``. A ``prepare``
  arriving later conflicts with it and votes no: no hanging branch.
* ``commit`` is ``COMMIT PREPARED``; repeated, it finds the committed row and
  succeeds; for a branch never prepared, or aborted, it is an error, never a
  silent success.

While a branch is prepared its row is held by the prepared transaction, so a
concurrent insert of the same key waits on it; ``lock_timeout`` bounds that
wait and the call then looks at ``pg_prepared_xacts`` instead.

Saga (forward action committed at once, compensation later):

* ``execute`` inserts ``(gid, branch, 'action', 'done')`` with the work, or
  finds the earlier answer.
* ``compensate`` inserts ``(gid, branch, 'compensate')``; if it also manages to
  insert the action row (as ``compensated``) the action never ran: nothing to
  undo, and the late action is refused. Otherwise it undoes what was done.
* An effect that must not be undone (a confirmed order is final) is refused
  by the manager's ``undo`` raising :class:`Refusal`: the local transaction
  rolls back, so nothing is recorded and the effect stays, and
  :class:`CompensationRefused` tells the caller (FAILED_PRECONDITION on the
  wire: the saga parks at once rather than retrying). A repeated Compensate
  asks ``undo`` again and gets the same refusal.

Failpoints: ``participant.after_prepare`` (prepared, before the vote is
answered) and ``participant.after_execute`` (an Execute's answer is known and
committed, before it goes back: a ``sleep`` there makes the answer late).
"""

from __future__ import annotations

import contextlib
import enum
import logging
from dataclasses import dataclass
from datetime import timedelta

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from dtx.v1 import participant_pb2
from dtx_runtime.failpoints import failpoint
from dtx_runtime.identifiers import prepared_name, sql_literal
from dtx_runtime.participant.manager import Refusal, ResourceManager

log = logging.getLogger(__name__)

ABORTED_FIRST = "aborted before it was prepared"
COMPENSATED_FIRST = "compensated before it ran"


class Vote(enum.Enum):
    COMMIT = "commit"
    ABORT = "abort"


@dataclass(frozen=True)
class Answer:
    """A participant's answer to prepare or execute: yes, or no with the reason."""

    vote: Vote
    reason: str = ""

    @property
    def yes(self) -> bool:
        return self.vote is Vote.COMMIT


class BranchUnknown(Exception):
    """Commit of a branch that was never prepared, or that was aborted."""


class BranchBusy(Exception):
    """Another call on the same branch held it for longer than the lock timeout."""


class CompensationRefused(Exception):
    """The manager refused to undo a branch's effect (it is final); nothing changed."""


# The opening statements of a prepare and of an execute go in one round trip:
# BEGIN, the lock timeout and the barrier row, as one simple-protocol query
# (which takes no bind parameters, hence the literals; see sql_literal). Its
# status, "INSERT 0 1" or "INSERT 0 0", says whether the row was new.
_BEGIN_PREPARE = (
    "BEGIN; SET LOCAL lock_timeout = {lock_timeout_ms:d};"
    " INSERT INTO dtx_barrier (gid, branch, op, outcome, operation)"
    " SELECT {gid}, {branch}, 'prepare', 'prepared', {operation}"
    " WHERE NOT EXISTS (SELECT 1 FROM pg_prepared_xacts WHERE gid = {name})"
    " ON CONFLICT DO NOTHING"
)
_BEGIN_EXECUTE = (
    "BEGIN;"
    " INSERT INTO dtx_barrier (gid, branch, op, outcome, reason, operation)"
    " VALUES ({gid}, {branch}, 'action', 'done', '', {operation})"
    " ON CONFLICT DO NOTHING"
)
_INSERTED = "INSERT 0 1"


def _bytea(data: bytes) -> str:
    """``data`` as an SQL bytea expression, hex only: nothing in it needs quoting."""
    return f"decode('{data.hex()}', 'hex')"


_RECORD = """
INSERT INTO dtx_barrier (gid, branch, op, outcome, reason, operation)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT DO NOTHING
RETURNING true
"""

_READ = (
    "SELECT outcome, reason, operation FROM dtx_barrier WHERE gid = $1 AND branch = $2 AND op = $3"
)


class Barrier:
    """Runs a :class:`ResourceManager`'s work under the barrier protocol."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        manager: ResourceManager,
        *,
        lock_timeout_ms: int = 1000,
        lock_attempts: int = 5,
    ) -> None:
        self._pool = pool
        self._manager = manager
        self._lock_timeout_ms = lock_timeout_ms
        self._lock_attempts = lock_attempts

    # -- two-phase commit -------------------------------------------------

    async def prepare(
        self, gid: str, branch: str, operation: participant_pb2.BranchOperation
    ) -> Answer:
        name = prepared_name(gid, branch)
        self._manager.validate(operation)
        begin = _BEGIN_PREPARE.format(
            lock_timeout_ms=self._lock_timeout_ms,
            gid=sql_literal(gid),
            branch=sql_literal(branch),
            operation=_bytea(operation.SerializeToString()),
            name=sql_literal(name),
        )
        async with self._pool.acquire() as conn:
            for _ in range(self._lock_attempts):
                try:
                    inserted = await conn.execute(begin) == _INSERTED
                    if not inserted:
                        await conn.execute("ROLLBACK")
                        return await self._earlier_prepare(conn, gid, branch, name)
                    try:
                        await self._manager.apply(conn, gid, branch, operation)
                    except Refusal as refusal:
                        await conn.execute("ROLLBACK")
                        return await self._record_no(conn, gid, branch, "prepare", refusal.reason)
                    except asyncpg.LockNotAvailableError:
                        # A business row (account, product) is held by another
                        # prepared branch: contention, not a refusal. The
                        # coordinator may retry within its prepare budget.
                        await conn.execute("ROLLBACK")
                        raise BranchBusy(
                            f"branch {name}: a row it needs is held by another transaction"
                        ) from None
                    await conn.execute(f"PREPARE TRANSACTION '{name}'")
                    await failpoint("participant.after_prepare")
                    return Answer(Vote.COMMIT)
                except asyncpg.LockNotAvailableError:
                    # The same branch is being prepared, or is prepared, elsewhere.
                    await conn.execute("ROLLBACK")
                    if await self._is_prepared(conn, name):
                        return Answer(Vote.COMMIT)
                except BaseException:
                    if conn.is_in_transaction():
                        await conn.execute("ROLLBACK")
                    raise
        raise BranchBusy(f"branch {name} stayed locked by another call")

    async def commit(self, gid: str, branch: str) -> None:
        name = prepared_name(gid, branch)
        async with self._pool.acquire() as conn:
            try:
                await conn.execute(f"COMMIT PREPARED '{name}'")
                return
            except asyncpg.UndefinedObjectError:
                pass
            row = await conn.fetchrow(_READ, gid, branch, "prepare")
            if row is not None and row["outcome"] == "prepared":
                return  # committed before: the row is visible only after COMMIT PREPARED
            if row is None:
                raise BranchUnknown(f"branch {name} was never prepared here")
            raise BranchUnknown(f"branch {name} cannot commit: it was {row['outcome']}")

    async def abort(self, gid: str, branch: str) -> None:
        name = prepared_name(gid, branch)
        async with self._pool.acquire() as conn:
            for _ in range(self._lock_attempts):
                await self._rollback_prepared(conn, name)
                try:
                    async with conn.transaction():
                        await conn.execute(f"SET LOCAL lock_timeout = {self._lock_timeout_ms}")
                        tombstone = await conn.fetchval(
                            _RECORD, gid, branch, "prepare", "aborted", ABORTED_FIRST, None
                        )
                        if not tombstone:
                            row = await conn.fetchrow(_READ, gid, branch, "prepare")
                            if row is not None and row["outcome"] == "prepared":
                                raise BranchUnknown(f"branch {name} cannot abort: it was committed")
                        await conn.fetchval(_RECORD, gid, branch, "abort", "aborted", "", None)
                    return
                except asyncpg.LockNotAvailableError:
                    continue  # a prepare is in flight: roll it back on the next turn
        raise BranchBusy(f"branch {name} stayed locked by another call")

    # -- saga -------------------------------------------------------------

    async def execute(
        self, gid: str, branch: str, operation: participant_pb2.BranchOperation
    ) -> Answer:
        prepared_name(gid, branch)  # validates both
        self._manager.validate(operation)
        answer = await self._execute(gid, branch, operation)
        await failpoint("participant.after_execute")
        return answer

    async def _execute(
        self, gid: str, branch: str, operation: participant_pb2.BranchOperation
    ) -> Answer:
        begin = _BEGIN_EXECUTE.format(
            gid=sql_literal(gid),
            branch=sql_literal(branch),
            operation=_bytea(operation.SerializeToString()),
        )
        async with self._pool.acquire() as conn:
            try:
                inserted = await conn.execute(begin) == _INSERTED
                if not inserted:
                    await conn.execute("ROLLBACK")
                    row = await conn.fetchrow(_READ, gid, branch, "action")
                    assert row is not None
                    if row["outcome"] == "done":
                        return Answer(Vote.COMMIT)
                    return Answer(Vote.ABORT, row["reason"])
                try:
                    await self._manager.apply(conn, gid, branch, operation)
                except Refusal as refusal:
                    await conn.execute("ROLLBACK")
                    return await self._record_no(conn, gid, branch, "action", refusal.reason)
                await conn.execute("COMMIT")
                return Answer(Vote.COMMIT)
            except BaseException:
                if conn.is_in_transaction():
                    await conn.execute("ROLLBACK")
                raise

    async def compensate(self, gid: str, branch: str) -> None:
        """Undo the branch's action (a recorded no-op if it never ran).

        Raises :class:`CompensationRefused` when the manager refuses to undo it;
        then nothing is recorded and the action's effect stays.
        """
        name = prepared_name(gid, branch)
        async with self._pool.acquire() as conn, conn.transaction():
            first = await conn.fetchval(_RECORD, gid, branch, "compensate", "done", "", None)
            if not first:
                return  # repeated compensation: done before
            # Claims the action's key: if this succeeds the action never ran.
            never_ran = await conn.fetchval(
                _RECORD, gid, branch, "action", "compensated", COMPENSATED_FIRST, None
            )
            if never_ran:
                await conn.execute(
                    "UPDATE dtx_barrier SET outcome = 'noop' WHERE gid = $1 AND branch = $2"
                    " AND op = 'compensate'",
                    gid,
                    branch,
                )
                return
            row = await conn.fetchrow(_READ, gid, branch, "action")
            assert row is not None
            if row["outcome"] != "done":
                return  # the action said no: nothing to undo
            operation = participant_pb2.BranchOperation.FromString(row["operation"])
            try:
                await self._manager.undo(conn, gid, branch, operation)
            except Refusal as refusal:
                # Leaving the block rolls the compensate row back with whatever undo did.
                raise CompensationRefused(
                    f"branch {name} cannot be compensated: {refusal.reason}"
                ) from None

    # -- housekeeping -----------------------------------------------------

    async def delete_older_than(self, retention: timedelta, batch: int = 1000) -> int:
        """Delete barrier rows past retention, in bounded batches; returns how many."""
        async with self._pool.acquire() as conn:
            result: str = await conn.execute(
                "DELETE FROM dtx_barrier WHERE ctid = ANY(ARRAY("
                " SELECT ctid FROM dtx_barrier WHERE created_at < now() - $1::interval"
                " LIMIT $2))",
                retention,
                batch,
            )
        return int(result.split()[-1])

    # -- helpers ----------------------------------------------------------

    async def _earlier_prepare(
        self, conn: PoolConnectionProxy, gid: str, branch: str, name: str
    ) -> Answer:
        if await self._is_prepared(conn, name):
            return Answer(Vote.COMMIT)
        row = await conn.fetchrow(_READ, gid, branch, "prepare")
        if row is None:  # pragma: no cover - committed or rolled back in between
            raise BranchBusy(f"branch {name} changed state during the call; retry")
        if row["outcome"] == "prepared":
            return Answer(Vote.COMMIT)  # prepared and already committed
        return Answer(Vote.ABORT, row["reason"])

    async def _record_no(
        self, conn: PoolConnectionProxy, gid: str, branch: str, op: str, reason: str
    ) -> Answer:
        recorded = await conn.fetchval(_RECORD, gid, branch, op, "no", reason, None)
        if recorded:
            return Answer(Vote.ABORT, reason)
        row = await conn.fetchrow(_READ, gid, branch, op)
        assert row is not None
        if row["outcome"] in ("prepared", "done"):
            return Answer(Vote.COMMIT)
        return Answer(Vote.ABORT, row["reason"])

    @staticmethod
    async def _is_prepared(conn: PoolConnectionProxy, name: str) -> bool:
        return bool(await conn.fetchval("SELECT true FROM pg_prepared_xacts WHERE gid = $1", name))

    @staticmethod
    async def _rollback_prepared(conn: PoolConnectionProxy, name: str) -> None:
        with contextlib.suppress(asyncpg.UndefinedObjectError):
            await conn.execute(f"ROLLBACK PREPARED '{name}'")

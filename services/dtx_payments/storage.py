"""Payments' SQL: functions over a connection, each a single statement where it can be.

A charge, its ledger row and its ``payment.charged`` outbox row are one
statement (data-modifying CTEs), so the hot path of a prepare is one round
trip besides the barrier's own.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from dtx_payments.domain import AccountState, Charge, NewAccount
from dtx_runtime.outbox import OUTBOX_COLUMNS, outbox_params

Conn = asyncpg.Connection | PoolConnectionProxy

_ACCOUNT_COLUMNS = "id, owner, currency, balance_minor, created_at"

_CREATE = f"""
WITH account AS (
    INSERT INTO accounts (id, owner, currency, balance_minor)
    VALUES ($1, $2, $3, $4)
    RETURNING {_ACCOUNT_COLUMNS}
), opened AS (
    INSERT INTO ledger (account_id, kind, amount_minor)
    SELECT id, 'open', balance_minor FROM account
)
SELECT {_ACCOUNT_COLUMNS} FROM account
"""

_CHARGE = f"""
WITH debited AS (
    UPDATE accounts SET balance_minor = balance_minor - $2
    WHERE id = $1 AND currency = $3 AND balance_minor >= $2
    RETURNING id, balance_minor
), recorded AS (
    INSERT INTO ledger (account_id, gid, branch, order_id, kind, amount_minor)
    SELECT id, $4, $5, NULLIF($6, ''), 'charge', -$2::bigint FROM debited
), event AS (
    INSERT INTO dtx_outbox ({OUTBOX_COLUMNS}) SELECT {outbox_params(7)} FROM debited
)
SELECT balance_minor FROM debited
"""

# The refund is what the ledger says this branch charged, not what the caller says.
_REFUND = """
WITH charged AS (
    SELECT account_id, -amount_minor AS amount, order_id
    FROM ledger WHERE gid = $1 AND branch = $2 AND kind = 'charge'
), credited AS (
    UPDATE accounts a SET balance_minor = a.balance_minor + c.amount
    FROM charged c WHERE a.id = c.account_id
    RETURNING a.id, c.amount, c.order_id, a.currency
), recorded AS (
    INSERT INTO ledger (account_id, gid, branch, order_id, kind, amount_minor)
    SELECT id, $1, $2, order_id, 'refund', amount FROM credited
    RETURNING amount_minor
)
SELECT c.id AS account_id, r.amount_minor, c.order_id, c.currency
FROM credited c CROSS JOIN recorded r
"""


@dataclass(frozen=True)
class Refund:
    """What a refund gave back, as the ledger recorded it."""

    account_id: uuid.UUID
    amount_minor: int
    currency: str
    order_id: str


async def create_account(conn: Conn, account_id: uuid.UUID, new: NewAccount) -> asyncpg.Record:
    row = await conn.fetchrow(_CREATE, account_id, new.owner, new.currency, new.balance_minor)
    assert row is not None
    return row


async def get_account(conn: Conn, account_id: uuid.UUID) -> asyncpg.Record | None:
    return await conn.fetchrow(f"SELECT {_ACCOUNT_COLUMNS} FROM accounts WHERE id = $1", account_id)


async def account_state(conn: Conn, account_id: uuid.UUID) -> AccountState | None:
    row = await conn.fetchrow(
        "SELECT currency, balance_minor FROM accounts WHERE id = $1", account_id
    )
    return None if row is None else AccountState(row["currency"], row["balance_minor"])


async def charge(
    conn: Conn, gid: str, branch: str, charge: Charge, event: Sequence[object]
) -> int | None:
    """Debit, record and write ``event`` (:func:`~dtx_runtime.outbox.outbox_values`).

    The balance afterwards, or None when the debit's condition failed (and
    nothing was written).
    """
    balance: int | None = await conn.fetchval(
        _CHARGE,
        charge.account_id,
        charge.amount_minor,
        charge.currency,
        gid,
        branch,
        charge.order_id,
        *event,
    )
    return balance


async def refund(conn: Conn, gid: str, branch: str) -> Refund | None:
    """Credit back what the branch charged; what was refunded, or None if it charged nothing."""
    row = await conn.fetchrow(_REFUND, gid, branch)
    if row is None:
        return None
    return Refund(row["account_id"], row["amount_minor"], row["currency"], row["order_id"] or "")

"""Writing events: one outbox row inside the caller's transaction, and the wake-up after commit.

``write_event`` never commits and never NOTIFYs: it runs inside the caller's
local transaction, which may be a two-phase commit branch that PostgreSQL
then prepares (and a transaction that ran NOTIFY cannot be prepared). The
relay learns of new rows from :func:`notify_committed`, which the code that
committed calls, from PostgreSQL notifications its standby peers forward, and
from a fallback poll.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from dtx.v1 import events_pb2
from dtx_runtime.outbox.envelope import Payload, build_event, capture_trace_context

Conn = asyncpg.Connection | PoolConnectionProxy

OUTBOX_COLUMNS = "id, topic, key, type, payload, headers"

_wakers: list[Callable[[], None]] = []


async def write_event(
    conn: Conn,
    *,
    topic: str,
    event_type: str,
    aggregate_id: str,
    payload: Payload,
) -> events_pb2.Event:
    """Insert the event into the outbox in the caller's transaction; returns the envelope.

    Call it after the state change it reports (so the row lock of the
    aggregate is already held and the outbox order follows the changes), and
    call :func:`notify_committed` once the transaction has committed.
    """
    if not conn.is_in_transaction():
        raise RuntimeError("write_event must run inside the transaction of the state change")
    event, values = outbox_values(
        topic=topic, event_type=event_type, aggregate_id=aggregate_id, payload=payload
    )
    await conn.execute(
        f"INSERT INTO dtx_outbox ({OUTBOX_COLUMNS}) VALUES ({outbox_params(1)})", *values
    )
    return event


def outbox_values(
    *, topic: str, event_type: str, aggregate_id: str, payload: Payload
) -> tuple[events_pb2.Event, tuple[object, ...]]:
    """An event's envelope and its outbox row, in the order of :data:`OUTBOX_COLUMNS`.

    For a state change that can be written as one statement: it inserts the
    row itself (``INSERT INTO dtx_outbox ... SELECT`` :func:`outbox_params`
    ``FROM`` the change's ``RETURNING``), so the event still exists exactly
    when the change does, at one round trip instead of four (BEGIN, change,
    event, COMMIT). The caller calls :func:`notify_committed` afterwards.
    """
    event = build_event(event_type, aggregate_id, payload)
    values = (
        uuid.UUID(event.id),
        topic,
        aggregate_id,
        event_type,
        event.SerializeToString(),
        json.dumps(capture_trace_context()),
    )
    return event, values


def outbox_params(first: int) -> str:
    """The select list of an outbox row's values passed as ``$first`` onwards."""
    params = [f"${first + i}" for i in range(len(OUTBOX_COLUMNS.split(",")))]
    params[-1] += "::jsonb"
    return ", ".join(params)


def notify_committed() -> None:
    """Wake the relays of this process: a transaction that wrote events has committed.

    Cheap and safe to call when nothing was written or no relay runs.
    """
    for wake in list(_wakers):
        wake()


def add_waker(wake: Callable[[], None]) -> Callable[[], None]:
    """Register a relay's wake-up; returns the function that unregisters it."""
    _wakers.append(wake)

    def remove() -> None:
        if wake in _wakers:
            _wakers.remove(wake)

    return remove

"""Orders as a participant: ``confirm_order`` moves the order PENDING → CONFIRMED.

In a two-phase commit this runs in the orders branch's prepared transaction,
so the order is confirmed exactly when the payment and the reservation
commit. In a saga it is the last step, the saga's pivot: a confirmed order is
final, so the orchestrator never compensates it by itself (an unknown outcome
is executed again, which the barrier answers with its first answer) and this
participant refuses the compensation when one comes anyway (a person's
AbortSaga): the saga is then parked, with the order still confirmed, its
payment and reservation kept. ``order.confirmed`` is written in the same
transaction as the change (see :mod:`dtx_orders.storage`); the barrier wakes
the outbox relay after it commits.
"""

from __future__ import annotations

import logging

from asyncpg.pool import PoolConnectionProxy

from dtx.v1 import participant_pb2
from dtx_orders import domain, storage
from dtx_orders.lookups import ConfirmedRows
from dtx_runtime.participant import Refusal

log = logging.getLogger(__name__)


class ConfirmOrderManager:
    """The :class:`~dtx_runtime.participant.ResourceManager` of ``confirm_order``.

    Each confirmed row is also handed to ``confirmed``, so that the request
    that placed the order can answer with it instead of reading it again.
    """

    def __init__(self, confirmed: ConfirmedRows | None = None) -> None:
        self.confirmed = confirmed if confirmed is not None else ConfirmedRows()

    def validate(self, operation: participant_pb2.BranchOperation) -> None:
        domain.parse_confirm(operation)

    async def apply(
        self,
        conn: PoolConnectionProxy,
        gid: str,
        branch: str,
        operation: participant_pb2.BranchOperation,
    ) -> None:
        order_id = domain.parse_confirm(operation)
        row = await storage.confirm(conn, order_id, gid)
        if row is not None:
            self.confirmed.put(gid, row)
            return
        found = await storage.status_of(conn, order_id)
        if found is None:
            raise Refusal(f"unknown order {order_id}")
        status, order_gid = found
        if order_gid != gid:
            raise Refusal(f"order {order_id} is settled by transaction {order_gid}, not {gid}")
        raise Refusal(f"order {order_id} is {status.value}, not PENDING")

    async def undo(
        self,
        conn: PoolConnectionProxy,
        gid: str,
        branch: str,
        operation: participant_pb2.BranchOperation,
    ) -> None:
        """Refuse: this action confirmed the order, and a confirmed order is final."""
        order_id = domain.parse_confirm(operation)
        found = await storage.status_of(conn, order_id)
        if found is not None and found[0] is domain.Status.CONFIRMED:
            raise Refusal(
                f"order {order_id} is CONFIRMED, and a confirmed order is final:"
                f" saga {gid} cannot cancel it"
            )
        # Not reachable through the state machine (CONFIRMED has no way out):
        # nothing this action did is left to undo.
        log.warning(
            "order %s is %s, not CONFIRMED, when %s compensated its confirmation",
            order_id,
            "unknown" if found is None else found[0].value,
            gid,
        )

"""Orders as a participant: ``confirm_order`` moves the order PENDING → CONFIRMED.

In a two-phase commit this runs in the orders branch's prepared transaction,
so the order is confirmed exactly when the payment and the reservation
commit. In a saga it is the last step; its compensation cancels the order.
Both write their event (``order.confirmed``, ``order.cancelled``) in the same
transaction (see :mod:`dtx_orders.storage`); the barrier wakes the outbox
relay after it commits.
"""

from __future__ import annotations

import logging

from asyncpg.pool import PoolConnectionProxy

from dtx.v1 import participant_pb2
from dtx_orders import domain, storage
from dtx_runtime.participant import Refusal

log = logging.getLogger(__name__)


class ConfirmOrderManager:
    """The :class:`~dtx_runtime.participant.ResourceManager` of ``confirm_order``."""

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
        if await storage.confirm(conn, order_id, gid):
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
        order_id = domain.parse_confirm(operation)
        if not await storage.cancel_confirmed(conn, order_id, f"compensated by saga {gid}"):
            log.warning("order %s was not CONFIRMED when %s compensated it", order_id, gid)

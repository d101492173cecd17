"""Inventory as a participant: a ``reserve`` holds stock inside the barrier's transaction."""

from __future__ import annotations

import logging

from asyncpg.pool import PoolConnectionProxy

from dtx.v1 import participant_pb2
from dtx_inventory import domain, storage
from dtx_runtime.participant import Refusal

log = logging.getLogger(__name__)


class ReserveManager:
    """The :class:`~dtx_runtime.participant.ResourceManager` of ``reserve``."""

    def validate(self, operation: participant_pb2.BranchOperation) -> None:
        domain.parse_reserve(operation)

    async def apply(
        self,
        conn: PoolConnectionProxy,
        gid: str,
        branch: str,
        operation: participant_pb2.BranchOperation,
    ) -> None:
        reservation = domain.parse_reserve(operation)
        items = await storage.reserve(conn, gid, branch, reservation)
        available = {i.sku: i.available for i in items if i.available is not None}
        reason = domain.refusal_reason(reservation.items, available)
        if reason is not None:
            raise Refusal(reason)
        for item in items:
            if not item.held:
                raise Refusal(
                    f"order {reservation.order_id} already holds a reservation of {item.sku}"
                )

    async def undo(
        self,
        conn: PoolConnectionProxy,
        gid: str,
        branch: str,
        operation: participant_pb2.BranchOperation,
    ) -> None:
        released = await storage.release(conn, gid, branch)
        if not released:
            log.warning("nothing to release for %s/%s: no held reservation", gid, branch)

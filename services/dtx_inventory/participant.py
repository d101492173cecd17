"""Inventory as a participant: a ``reserve`` holds stock inside the barrier's transaction.

The reservation writes ``stock.reserved`` and its undo ``stock.released`` into
the outbox in the same transaction (for a two-phase commit: the prepared one),
keyed by the order id.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from asyncpg.pool import PoolConnectionProxy

from dtx.v1 import common_pb2, events_pb2, participant_pb2
from dtx_inventory import domain, storage
from dtx_inventory.domain import Line
from dtx_runtime.outbox import INVENTORY_TOPIC, outbox_values, write_event
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
        _, reserved = outbox_values(
            topic=INVENTORY_TOPIC,
            event_type="stock.reserved",
            aggregate_id=reservation.order_id,
            payload=_stock_event(gid, reservation.order_id, reservation.items),
        )
        items = await storage.reserve(conn, gid, branch, reservation, reserved)
        available = {i.sku: i.available for i in items if i.available is not None}
        prices = {i.sku: i.price_minor for i in items if i.price_minor is not None}
        reason = domain.refusal_reason(
            reservation.items,
            available,
            prices=prices,
            expected_prices=reservation.expected_prices,
        )
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
            return
        order_id = domain.parse_reserve(operation).order_id
        await write_event(
            conn,
            topic=INVENTORY_TOPIC,
            event_type="stock.released",
            aggregate_id=order_id,
            payload=_stock_event(gid, order_id, released),
        )


def _stock_event(gid: str, order_id: str, lines: Iterable[Line]) -> events_pb2.StockEvent:
    """The payload of stock.reserved / stock.released (keyed by the order id)."""
    return events_pb2.StockEvent(
        order_id=order_id,
        items=[
            common_pb2.LineItem(sku=line.sku, quantity=line.quantity)
            for line in sorted(lines, key=lambda line: line.sku)
        ],
        gid=gid,
    )

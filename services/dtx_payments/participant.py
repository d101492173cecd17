"""Payments as a participant: a ``charge`` debits the account inside the barrier's transaction.

The charge writes ``payment.charged`` and its undo ``payment.refunded`` into
the outbox in the same transaction (for a two-phase commit: the prepared one),
keyed by the order id (the gid when the charge names no order).
"""

from __future__ import annotations

import logging

from asyncpg.pool import PoolConnectionProxy

from dtx.v1 import events_pb2, participant_pb2
from dtx_payments import domain, storage
from dtx_runtime.outbox import PAYMENTS_TOPIC, outbox_values, write_event
from dtx_runtime.participant import Refusal

log = logging.getLogger(__name__)


class ChargeManager:
    """The :class:`~dtx_runtime.participant.ResourceManager` of ``charge``."""

    def validate(self, operation: participant_pb2.BranchOperation) -> None:
        domain.parse_charge(operation)

    async def apply(
        self,
        conn: PoolConnectionProxy,
        gid: str,
        branch: str,
        operation: participant_pb2.BranchOperation,
    ) -> None:
        charge = domain.parse_charge(operation)
        _, charged = outbox_values(
            topic=PAYMENTS_TOPIC,
            event_type="payment.charged",
            aggregate_id=charge.order_id or gid,
            payload=events_pb2.PaymentEvent(
                account_id=str(charge.account_id),
                order_id=charge.order_id,
                amount_minor=charge.amount_minor,
                currency=charge.currency,
                gid=gid,
            ),
        )
        if await storage.charge(conn, gid, branch, charge, charged) is None:
            state = await storage.account_state(conn, charge.account_id)
            raise Refusal(domain.refusal_reason(charge, state))

    async def undo(
        self,
        conn: PoolConnectionProxy,
        gid: str,
        branch: str,
        operation: participant_pb2.BranchOperation,
    ) -> None:
        refund = await storage.refund(conn, gid, branch)
        if refund is None:
            # The barrier only undoes actions recorded as done, which always charged.
            log.warning("nothing to refund for %s/%s: no charge in the ledger", gid, branch)
            return
        await write_event(
            conn,
            topic=PAYMENTS_TOPIC,
            event_type="payment.refunded",
            aggregate_id=refund.order_id or gid,
            payload=events_pb2.PaymentEvent(
                account_id=str(refund.account_id),
                order_id=refund.order_id,
                amount_minor=refund.amount_minor,
                currency=refund.currency,
                gid=gid,
            ),
        )

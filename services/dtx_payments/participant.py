"""Payments as a participant: a ``charge`` debits the account inside the barrier's transaction."""

from __future__ import annotations

import logging

from asyncpg.pool import PoolConnectionProxy

from dtx.v1 import participant_pb2
from dtx_payments import domain, storage
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
        if await storage.charge(conn, gid, branch, charge) is None:
            state = await storage.account_state(conn, charge.account_id)
            raise Refusal(domain.refusal_reason(charge, state))

    async def undo(
        self,
        conn: PoolConnectionProxy,
        gid: str,
        branch: str,
        operation: participant_pb2.BranchOperation,
    ) -> None:
        if await storage.refund(conn, gid, branch) is None:
            # The barrier only undoes actions recorded as done, which always charged.
            log.warning("nothing to refund for %s/%s: no charge in the ledger", gid, branch)

"""The ``dtx.v1.Coordinator`` gRPC service."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from dtx.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc, transactions_pb2
from dtx_coordinator.domain import (
    PROTO_TO_STATE,
    STATE_TO_PROTO,
    Decision,
    GlobalTransaction,
    State,
    driving_state,
    outcome_of,
)
from dtx_coordinator.engine import Engine
from dtx_runtime.coordination.records import Attempt, check_actor
from dtx_runtime.errors import FailedPrecondition, InvalidArgument, NotFound
from dtx_runtime.identifiers import check_gid
from dtx_runtime.rpc import rpc

Context = grpc.aio.ServicerContext[Any, Any]


def _ts(value: Any) -> Timestamp | None:
    if value is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def to_proto(
    txn: GlobalTransaction, attempts: list[Attempt] | None = None
) -> transactions_pb2.Transaction:
    message = transactions_pb2.Transaction(
        gid=txn.gid,
        protocol=common_pb2.PROTOCOL_TWO_PHASE_COMMIT,
        state=STATE_TO_PROTO[txn.state],
        outcome=outcome_of(txn.state, txn.decision),
        reason=txn.reason,
        attempts=txn.attempts,
    )
    for field in ("created_at", "updated_at", "deadline"):
        stamp = _ts(txn.extra.get(field))
        if stamp is not None:
            getattr(message, field).CopyFrom(stamp)
    for branch in txn.branches:
        status = message.branches.add(
            branch=branch.branch,
            participant=branch.participant,
            state=branch.state.value,
            reason=branch.reason,
        )
        for attempt in attempts or []:
            if attempt.branch == branch.branch:
                item = status.attempts.add(
                    action=attempt.action,
                    attempt=attempt.attempt,
                    result=attempt.result,
                    detail=attempt.detail,
                )
                stamp = _ts(attempt.at)
                if stamp is not None:
                    item.at.CopyFrom(stamp)
    return message


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @rpc
    async def RunTransaction(
        self, request: coordinator_pb2.RunTransactionRequest, context: Context
    ) -> coordinator_pb2.RunTransactionResponse:
        if request.timeout_ms < 0:
            raise InvalidArgument("timeout_ms: must not be negative")
        # Shielded: a caller that gives up must not stop a transaction halfway;
        # it finishes here rather than waiting for recovery.
        run = asyncio.ensure_future(
            self._engine.run(request.gid, request.branches, request.timeout_ms)
        )
        txn = await asyncio.shield(run)
        return coordinator_pb2.RunTransactionResponse(transaction=to_proto(txn))

    @rpc
    async def GetOutcome(
        self, request: coordinator_pb2.GetOutcomeRequest, context: Context
    ) -> coordinator_pb2.GetOutcomeResponse:
        gid = check_gid(request.gid)
        txn = await self._engine.log.get(gid)
        if txn is None:
            await self._engine.log.presume_abort(gid)
            txn = await self._engine.log.get(gid)
            assert txn is not None
        return coordinator_pb2.GetOutcomeResponse(outcome=outcome_of(txn.state, txn.decision))

    @rpc
    async def GetTransaction(
        self, request: transactions_pb2.GetTransactionRequest, context: Context
    ) -> transactions_pb2.Transaction:
        txn = await self._get(request.gid)
        return to_proto(txn, await self._engine.log.attempts(txn.gid))

    @rpc
    async def ListTransactions(
        self, request: transactions_pb2.ListTransactionsRequest, context: Context
    ) -> transactions_pb2.ListTransactionsResponse:
        limit = request.limit or 50
        if not 1 <= limit <= 500:
            raise InvalidArgument("limit: must be between 1 and 500")
        if request.state == transactions_pb2.TRANSACTION_STATE_UNSPECIFIED:
            states = list(State)
        elif request.state in PROTO_TO_STATE:
            states = [PROTO_TO_STATE[request.state]]
        else:
            return transactions_pb2.ListTransactionsResponse()  # a saga state: none here
        rows = await self._engine.log.list_by_state(states, limit)
        return transactions_pb2.ListTransactionsResponse(transactions=[to_proto(t) for t in rows])

    @rpc
    async def RetryTransaction(
        self, request: transactions_pb2.InterveneRequest, context: Context
    ) -> transactions_pb2.Transaction:
        txn = await self._get(request.gid)
        check_actor(request)
        if txn.state is not State.NEEDS_INTERVENTION:
            raise FailedPrecondition(
                f"transaction {txn.gid} is {txn.state.value};"
                " only NEEDS_INTERVENTION can be retried"
            )
        decision = txn.decision or Decision.ABORT
        await self._engine.log.intervene(
            txn.gid,
            "retry",
            request.actor,
            request.reason,
            new_state=driving_state(decision),
            decision=decision,
        )
        return to_proto(await self._get(txn.gid))

    @rpc
    async def AbortTransaction(
        self, request: transactions_pb2.InterveneRequest, context: Context
    ) -> transactions_pb2.Transaction:
        txn = await self._get(request.gid)
        check_actor(request)
        if txn.decision is Decision.COMMIT:
            raise FailedPrecondition(
                f"transaction {txn.gid} has a logged commit decision and cannot be aborted;"
                " retry it instead"
            )
        if txn.state.finished:
            raise FailedPrecondition(f"transaction {txn.gid} is already {txn.state.value}")
        await self._engine.log.intervene(
            txn.gid,
            "abort",
            request.actor,
            request.reason,
            new_state=State.ABORTING,
            decision=Decision.ABORT,
        )
        return to_proto(await self._get(txn.gid))

    async def _get(self, gid: str) -> GlobalTransaction:
        txn = await self._engine.log.get(check_gid(gid))
        if txn is None:
            raise NotFound(f"gid {gid}: no such transaction")
        return txn

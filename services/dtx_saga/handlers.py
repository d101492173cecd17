"""The ``dtx.v1.SagaOrchestrator`` gRPC service."""

from __future__ import annotations

from dtx.v1 import saga_pb2, saga_pb2_grpc, transactions_pb2
from dtx_runtime.coordination.records import check_actor
from dtx_runtime.errors import InvalidArgument, NotFound
from dtx_runtime.identifiers import check_gid
from dtx_runtime.rpc import Context, rpc
from dtx_saga import domain, metrics
from dtx_saga.domain import PROTO_TO_STATE, Saga, State, to_proto
from dtx_saga.engine import Engine

DEFAULT_LIST_LIMIT = 50
MAX_LIST_LIMIT = 500


class SagaOrchestratorServicer(saga_pb2_grpc.SagaOrchestratorServicer):
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @rpc
    async def RunSaga(
        self, request: saga_pb2.RunSagaRequest, context: Context
    ) -> saga_pb2.RunSagaResponse:
        if request.timeout_ms < 0:
            raise InvalidArgument("timeout_ms: must not be negative")
        saga = await self._engine.run(request.gid, request.steps, request.timeout_ms)
        return saga_pb2.RunSagaResponse(saga=to_proto(saga))

    @rpc
    async def GetSaga(
        self, request: transactions_pb2.GetTransactionRequest, context: Context
    ) -> transactions_pb2.Transaction:
        saga = await self._get(request.gid)
        return to_proto(saga, await self._engine.log.attempts(saga.gid))

    @rpc
    async def ListSagas(
        self, request: transactions_pb2.ListTransactionsRequest, context: Context
    ) -> transactions_pb2.ListTransactionsResponse:
        limit = request.limit or DEFAULT_LIST_LIMIT
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise InvalidArgument(f"limit: must be between 1 and {MAX_LIST_LIMIT}")
        if request.state == transactions_pb2.TRANSACTION_STATE_UNSPECIFIED:
            states = list(State)
        elif request.state in PROTO_TO_STATE:
            states = [PROTO_TO_STATE[request.state]]
        else:
            return transactions_pb2.ListTransactionsResponse()  # a 2PC state: none here
        rows = await self._engine.log.list_by_state(states, limit)
        return transactions_pb2.ListTransactionsResponse(transactions=[to_proto(s) for s in rows])

    @rpc
    async def RetrySaga(
        self, request: transactions_pb2.InterveneRequest, context: Context
    ) -> transactions_pb2.Transaction:
        gid = check_gid(request.gid)
        check_actor(request)

        def change(saga: Saga) -> bool:
            domain.retry(saga)
            return True

        found = await self._engine.log.intervene(
            gid, "retry", request.actor, request.reason, change
        )
        if found is None:
            raise NotFound(f"gid {gid}: no such saga")
        return to_proto(found[0])

    @rpc
    async def AbortSaga(
        self, request: transactions_pb2.InterveneRequest, context: Context
    ) -> transactions_pb2.Transaction:
        """Turn a forward saga back; an unknown gid is recorded COMPENSATED (a tombstone).

        A saga already heading backward (COMPENSATING, or parked while
        compensating) is returned unchanged: it is on its way to COMPENSATED.
        """
        gid = check_gid(request.gid)
        check_actor(request)
        reason = f"aborted by {request.actor}: {request.reason}"
        log = self._engine.log
        for _ in range(2):  # a tombstone loses only to a RunSaga that logged the gid meanwhile
            found = await log.intervene(
                gid, "abort", request.actor, request.reason, lambda s: domain.abort(s, reason)
            )
            if found is not None:
                saga, changed = found
                if changed:
                    metrics.COMPENSATIONS.labels("aborted").inc()
                return to_proto(saga)
            if await log.tombstone(domain.tombstone(gid, reason), request.actor, request.reason):
                metrics.TRANSACTIONS.labels(metrics.PROTOCOL, "compensated").inc()
                return to_proto(await self._get(gid))
        raise AssertionError("unreachable: the gid is logged after a lost tombstone insert")

    async def _get(self, gid: str) -> Saga:
        saga = await self._engine.log.get(check_gid(gid))
        if saga is None:
            raise NotFound(f"gid {gid}: no such saga")
        return saga

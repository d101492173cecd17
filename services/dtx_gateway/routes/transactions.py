"""Global transactions of both engines, read and repaired by operators (admin only)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Literal

import grpc
from fastapi import APIRouter, Path, Query

from dtx.v1 import transactions_pb2
from dtx_gateway import convert, schemas
from dtx_gateway.backends import Backends, call, to_api_error
from dtx_gateway.deps import Admin, Remote
from dtx_gateway.errors import AUTHENTICATED, not_found, responses, unavailable

router = APIRouter(prefix="/v1/transactions", tags=["transactions"])

Source = Literal["coordinator", "saga"]
GidPath = Annotated[str, Path(pattern=schemas.GID_PATTERN, examples=["order-1f0c2a"])]
LIST_MAX = 500
_UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
_OLDEST = datetime.min.replace(tzinfo=UTC)


def _lister(
    remote: Backends, source: Source
) -> Callable[..., Awaitable[transactions_pb2.ListTransactionsResponse]]:
    return remote.coordinator.ListTransactions if source == "coordinator" else remote.saga.ListSagas


async def _list_source(
    remote: Backends, source: Source, states: list[int], limit: int
) -> list[transactions_pb2.Transaction]:
    lister = _lister(remote, source)
    answers = await asyncio.gather(
        *(
            lister(
                transactions_pb2.ListTransactionsRequest(state=state, limit=limit),  # type: ignore[arg-type]
                timeout=remote.call_timeout_s,
            )
            for state in states
        )
    )
    return [t for answer in answers for t in answer.transactions]


@router.get(
    "",
    summary="Global transactions and sagas by state group (admin)",
    description="Asks the 2PC coordinator (ListTransactions) and the saga orchestrator"
    " (ListSagas) and merges their answers, newest first. Without `state`, every state."
    " When one of the two does not answer, the list is partial and `unavailable` names it;"
    " when neither does, 503.\n\n" + convert.STATE_GROUPS_DOC,
    responses=responses(*AUTHENTICATED),
)
async def list_transactions(
    caller: Admin,
    remote: Remote,
    state: Annotated[
        schemas.TransactionGroup | None, Query(description="A state group; see the table.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=LIST_MAX)] = 50,
) -> schemas.TransactionList:
    plan: dict[Source, list[int]] = {"coordinator": [], "saga": []}
    if state is None:
        plan = {
            "coordinator": [transactions_pb2.TRANSACTION_STATE_UNSPECIFIED],
            "saga": [transactions_pb2.TRANSACTION_STATE_UNSPECIFIED],
        }
    else:
        for proto_state in convert.STATE_GROUPS[state]:
            if proto_state in convert.COORDINATOR_STATES:
                plan["coordinator"].append(proto_state)
            if proto_state in convert.SAGA_STATES:
                plan["saga"].append(proto_state)
    # "retrying" is a filter on unfinished states: read as many as allowed, then filter.
    fetch = LIST_MAX if state == "retrying" else limit
    sources = [s for s, states in plan.items() if states]
    results = await asyncio.gather(
        *(_list_source(remote, s, plan[s], fetch) for s in sources), return_exceptions=True
    )
    found: list[schemas.Transaction] = []
    missing: list[Source] = []
    for source, result in zip(sources, results, strict=True):
        if isinstance(result, grpc.aio.AioRpcError):
            if result.code() in _UNREACHABLE:
                missing.append(source)
                continue
            raise to_api_error(source, result)
        if isinstance(result, BaseException):
            raise result
        kind = "2pc" if source == "coordinator" else "saga"
        found += [
            convert.transaction(t, kind)
            for t in result
            if state is None or convert.in_group(t, state)
        ]
    if sources and len(missing) == len(sources):
        raise unavailable(f"{' and '.join(missing)} unavailable; retry")
    found.sort(key=lambda t: t.created_at or _OLDEST, reverse=True)
    return schemas.TransactionList(transactions=found[:limit], unavailable=missing)


async def _locate(remote: Backends, gid: str) -> tuple[Source, transactions_pb2.Transaction]:
    """Ask the coordinator, then the saga orchestrator when the coordinator does not know it."""
    request = transactions_pb2.GetTransactionRequest(gid=gid)
    try:
        return "coordinator", await remote.coordinator.GetTransaction(
            request, timeout=remote.call_timeout_s
        )
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND:
            raise to_api_error("coordinator", exc) from None
    try:
        return "saga", await remote.saga.GetSaga(request, timeout=remote.call_timeout_s)
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            raise not_found(f"transaction {gid} not found") from None
        raise to_api_error("saga", exc) from None


def _kind(source: Source) -> str:
    return "2pc" if source == "coordinator" else "saga"


@router.get(
    "/{gid}",
    summary="One global transaction with each branch's attempts and outcomes (admin)",
    responses=responses(*AUTHENTICATED, 404),
)
async def get_transaction(gid: GidPath, caller: Admin, remote: Remote) -> schemas.Transaction:
    source, found = await _locate(remote, gid)
    return convert.transaction(found, _kind(source))


async def _intervene(
    remote: Backends, gid: str, action: Literal["retry", "abort"], actor: str, reason: str
) -> schemas.Transaction:
    source, _ = await _locate(remote, gid)
    request = transactions_pb2.InterveneRequest(gid=gid, actor=actor, reason=reason)
    if source == "coordinator":
        method = (
            remote.coordinator.RetryTransaction
            if action == "retry"
            else remote.coordinator.AbortTransaction
        )
    else:
        method = remote.saga.RetrySaga if action == "retry" else remote.saga.AbortSaga
    changed = await call(source, method(request, timeout=remote.call_timeout_s))
    return convert.transaction(changed, _kind(source))


_INTERVENTION = (
    " The token's `sub` is recorded as the actor, with the `reason`, in the audit log of the"
    " coordinator or the saga orchestrator. 409 when the transaction's state refuses it."
)


@router.post(
    "/{gid}/retry",
    summary="Resume a transaction parked as needs_intervention (admin)",
    description="Phase two (2PC) or the saga's steps run again from where they stopped."
    + _INTERVENTION,
    responses=responses(*AUTHENTICATED, 404, 409, 413),
)
async def retry_transaction(
    gid: GidPath, body: schemas.Intervention, caller: Admin, remote: Remote
) -> schemas.Transaction:
    return await _intervene(remote, gid, "retry", caller.sub, body.reason)


@router.post(
    "/{gid}/abort",
    summary="Abort an undecided transaction, or turn a saga back (admin)",
    description="A 2PC transaction with a logged commit decision cannot be aborted (409);"
    " a saga is compensated." + _INTERVENTION,
    responses=responses(*AUTHENTICATED, 404, 409, 413),
)
async def abort_transaction(
    gid: GidPath, body: schemas.Intervention, caller: Admin, remote: Remote
) -> schemas.Transaction:
    return await _intervene(remote, gid, "abort", caller.sub, body.reason)

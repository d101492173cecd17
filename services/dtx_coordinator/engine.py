"""The two-phase-commit protocol, run inline for new transactions and by recovery.

Phase one prepares every branch in parallel, each bounded by its timeout, with
transient failures (UNAVAILABLE) retried with backoff inside that bound. The
decision is then logged — a commit durably, before any participant hears of
it — and phase two commits or aborts every branch that needs it. Whatever
phase two could not settle is left to the recovery loop with a backoff, and
after the policy's attempts it is parked as NEEDS_INTERVENTION instead of
retried forever.

Deciding is a conditional write (``decision IS NULL``), so when an inline run
and a recovering replica race, the first decision wins and the other follows it.

A caller that is itself a participant (orders, whose branch confirms the
order) may prepare its own branch before asking (``prepared_by_caller``): the
coordinator then neither prepares it nor, inline, sends it phase two — the
answer carries the decision and the caller applies it locally, two calls
fewer per transaction. Nothing is lost if the caller dies first: the log has
the decision, and the caller's reaper asks GetOutcome for its prepared branch;
a recovering coordinator, which has no caller to answer, drives the branch
like any other.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TypeVar

import grpc

from dtx.v1 import participant_pb2, participant_pb2_grpc, transactions_pb2
from dtx_coordinator.domain import (
    BranchRecord,
    BranchState,
    Decision,
    GlobalTransaction,
    State,
    decide,
    delegate_to_caller,
    driving_state,
    final_state,
    owes_phase_two,
    settled_state,
    validate_request,
)
from dtx_coordinator.storage import TransactionLog
from dtx_runtime.coordination import metrics
from dtx_runtime.coordination.calls import REFUSALS, TRANSIENT, DeadlinePassed, call_with_retries
from dtx_runtime.coordination.participants import Participants
from dtx_runtime.coordination.records import Attempt
from dtx_runtime.errors import InvalidArgument, ResourceExhausted, Unavailable
from dtx_runtime.failpoints import failpoint
from dtx_runtime.policy import PolicyHolder, TransactionPolicy

log = logging.getLogger(__name__)

PROTOCOL = "2pc"
T = TypeVar("T")


class ParkNow(Exception):
    """Phase two met an answer that no retry can change; a person must look."""


class Engine:
    def __init__(
        self,
        log_: TransactionLog,
        policy: PolicyHolder,
        endpoints: Callable[[str], str | None],
        known: Callable[[], Iterable[str]],
        *,
        owner: str,
    ) -> None:
        self.log = log_
        self._known = known
        self.policy = policy
        self._endpoints = endpoints
        self._participants = Participants(endpoints)
        self.owner = owner
        self.local: set[str] = set()  # gids this process is driving now

    async def close(self) -> None:
        await self._participants.close()

    def participants(self) -> list[str]:
        """The participants a branch may name: known to the policy or the settings, reachable."""
        return sorted(n for n in set(self._known()) if self._endpoints(n))

    def _stub(self, participant: str) -> participant_pb2_grpc.ParticipantAsyncStub:
        return self._participants.stub(participant)

    # -- inline -----------------------------------------------------------

    async def run(
        self, gid: str, branches: Sequence[transactions_pb2.Branch], timeout_ms: int
    ) -> GlobalTransaction:
        policy = self.policy.current
        if policy.suspend:
            raise Unavailable("new transactions are suspended by the policy")
        validate_request(gid, branches, self.participants())
        if len(self.local) >= policy.max_in_flight:
            raise ResourceExhausted(
                f"{len(self.local)} transactions in flight;"
                f" the policy allows {policy.max_in_flight}"
            )
        timeout_ms = timeout_ms or policy.timeouts.transaction_ms
        if timeout_ms < policy.timeouts.prepare_ms:
            raise InvalidArgument(
                f"timeout_ms: {timeout_ms} is below the prepare timeout"
                f" {policy.timeouts.prepare_ms}"
            )
        records = [BranchRecord.of_request(b) for b in branches]
        if gid in self.local:
            return await self._await_existing(gid, timeout_ms)
        self.local.add(gid)
        metrics.IN_FLIGHT.labels(PROTOCOL).inc()
        started = time.perf_counter()
        try:
            fresh = await self.log.begin(
                gid, records, timeout_ms=timeout_ms, owner=self.owner, lease_ms=timeout_ms + 5_000
            )
            if not fresh:
                return await self._await_existing(gid, timeout_ms)
            txn = GlobalTransaction(gid, State.PREPARING, None, records)
            with _timed("prepare"):
                await self._prepare_all(txn, policy)
            decision, reason = decide(txn.branches)
            await failpoint("coordinator.before_decision")
            await self._decide(txn, decision, reason, policy)
            await failpoint("coordinator.after_decision")
            delegate_to_caller(txn.branches)  # the answer carries the decision to the caller
            await self._settle(txn, policy)
            return txn
        finally:
            self.local.discard(gid)
            metrics.IN_FLIGHT.labels(PROTOCOL).dec()
            metrics.PHASE_SECONDS.labels(PROTOCOL, "total").observe(time.perf_counter() - started)

    async def _await_existing(self, gid: str, timeout_ms: int) -> GlobalTransaction:
        """A repeated RunTransaction: wait (bounded) for the first run's result."""
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            txn = await self.log.get(gid)
            assert txn is not None
            if txn.state.finished or txn.state is State.NEEDS_INTERVENTION:
                return txn
            if time.monotonic() >= deadline:
                return txn
            await asyncio.sleep(0.05)

    async def _prepare_all(self, txn: GlobalTransaction, policy: TransactionPolicy) -> None:
        # The caller's own branch is prepared already (it voted yes by asking).
        await asyncio.gather(
            *(self._prepare(txn.gid, b, policy) for b in txn.branches if not b.by_caller)
        )

    async def _prepare(self, gid: str, branch: BranchRecord, policy: TransactionPolicy) -> None:
        operation = participant_pb2.BranchOperation.FromString(branch.operation)
        request = participant_pb2.PrepareRequest(gid=gid, branch=branch.branch, operation=operation)
        budget = policy.timeout_of(branch.participant, policy.timeouts.prepare_ms)
        try:
            reply = await self._call(
                gid,
                branch,
                "prepare",
                budget,
                policy,
                lambda t: self._stub(branch.participant).Prepare(request, timeout=t),
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in REFUSALS:
                branch.state, branch.reason = BranchState.NO, exc.details() or exc.code().name
            else:
                branch.state = BranchState.FAILED
                branch.reason = f"prepare failed: {exc.code().name} {exc.details() or ''}".strip()
            return
        except (Unavailable, DeadlinePassed) as exc:
            branch.state, branch.reason = BranchState.FAILED, f"prepare failed: {exc}"
            return
        if reply.vote == participant_pb2.VOTE_COMMIT:
            branch.state = BranchState.PREPARED
        elif reply.vote == participant_pb2.VOTE_READ_ONLY:
            # Nothing is held: the read-only optimisation skips its phase two.
            branch.state = BranchState.READ_ONLY
        else:
            branch.state, branch.reason = BranchState.NO, reply.reason or "voted no"

    async def _decide(
        self, txn: GlobalTransaction, decision: Decision, reason: str, policy: TransactionPolicy
    ) -> None:
        with _timed("decide"):
            won = await self.log.decide(
                txn.gid, decision, reason, txn.branches, lease_ms=self._phase_two_lease(policy)
            )
        if won:
            txn.decision, txn.reason, txn.state = decision, reason, driving_state(decision)
            return
        # Someone (a recovering replica after our deadline) decided first: follow it.
        logged = await self.log.get(txn.gid)
        assert logged is not None
        assert logged.decision is not None
        txn.decision, txn.reason, txn.state = logged.decision, logged.reason, logged.state
        log.warning("decision for %s was taken elsewhere: %s", txn.gid, logged.decision.value)

    def lease_ms(self, policy: TransactionPolicy) -> int:
        """How long a recovery claim holds a transaction."""
        return max(10_000, 4 * policy.timeouts.commit_ms)

    def _phase_two_lease(self, policy: TransactionPolicy) -> int:
        return max(5_000, 2 * policy.timeouts.commit_ms)

    # -- phase two (inline and recovery) ------------------------------------

    async def _settle(self, txn: GlobalTransaction, policy: TransactionPolicy) -> None:
        """Phase two for every branch that owes it; then finish, retry later, or park."""
        assert txn.decision is not None
        decision = txn.decision
        owed = [b for b in txn.branches if owes_phase_two(b, decision)]
        action = "commit" if decision is Decision.COMMIT else "abort"
        park_reason: str | None = None
        with _timed(action):
            results = await asyncio.gather(
                *(self._phase_two(txn.gid, b, decision, policy) for b in owed),
                return_exceptions=True,
            )
        for branch, result in zip(owed, results, strict=True):
            if isinstance(result, ParkNow):
                park_reason = f"{branch.branch}: {result}"
            elif isinstance(result, BaseException) and not isinstance(result, Exception):
                raise result
        if all(not owes_phase_two(b, decision) for b in txn.branches):
            txn.state = final_state(decision)
            await self.log.finish(txn.gid, txn.state, txn.branches)
            metrics.TRANSACTIONS.labels(PROTOCOL, txn.state.value.lower()).inc()
            return
        txn.attempts += 1
        if park_reason is None and txn.attempts >= policy.recovery.max_attempts:
            park_reason = f"phase two unfinished after {txn.attempts} rounds"
        if park_reason is not None:
            txn.state, txn.reason = State.NEEDS_INTERVENTION, park_reason
            metrics.TRANSACTIONS.labels(PROTOCOL, "needs_intervention").inc()
            log.error("transaction %s needs intervention: %s", txn.gid, park_reason)
        await self.log.reschedule(
            txn.gid,
            txn.branches,
            attempts=txn.attempts,
            delay_ms=policy.retries.backoff_ms(txn.attempts),
            park_reason=park_reason,
        )

    async def _phase_two(
        self, gid: str, branch: BranchRecord, decision: Decision, policy: TransactionPolicy
    ) -> None:
        stub = self._stub(branch.participant)
        budget = policy.timeout_of(branch.participant, policy.timeouts.commit_ms)
        action = "commit" if decision is Decision.COMMIT else "abort"
        branch.attempts += 1
        try:
            if decision is Decision.COMMIT:
                request_c = participant_pb2.CommitRequest(gid=gid, branch=branch.branch)
                await self._call(
                    gid, branch, action, budget, policy, lambda t: stub.Commit(request_c, timeout=t)
                )
            else:
                request_a = participant_pb2.AbortRequest(gid=gid, branch=branch.branch)
                await self._call(
                    gid, branch, action, budget, policy, lambda t: stub.Abort(request_a, timeout=t)
                )
        except grpc.aio.AioRpcError as exc:
            branch.reason = f"{action} failed: {exc.code().name} {exc.details() or ''}".strip()
            if exc.code() in REFUSALS:
                raise ParkNow(branch.reason) from None
            return
        except (Unavailable, DeadlinePassed) as exc:
            branch.reason = f"{action} failed: {exc}"
            return
        branch.state, branch.reason = settled_state(decision), ""

    async def _call(
        self,
        gid: str,
        branch: BranchRecord,
        action: str,
        budget_s: float,
        policy: TransactionPolicy,
        call: Callable[[float], Awaitable[T]],
    ) -> T:
        """One participant call; transient errors retried with backoff inside one budget.

        DEADLINE_EXCEEDED is not retried: the budget is spent.
        """

        async def record(attempt: int, exc: grpc.aio.AioRpcError) -> None:
            detail = f"{exc.code().name}: {exc.details() or ''}"
            await self.log.record_attempts(
                [Attempt(gid, branch.branch, action, attempt, "error", detail)]
            )

        return await call_with_retries(
            call,
            retries=policy.retries,
            timeout_s=budget_s,
            deadline=time.monotonic() + budget_s,
            retryable=TRANSIENT,
            on_error=record,
            on_retry=metrics.RETRIES.labels(PROTOCOL, action).inc,
        )

    # -- recovery -----------------------------------------------------------

    async def drive(self, txn: GlobalTransaction) -> None:
        """Finish a claimed transaction: abort it if undecided, else complete phase two."""
        policy = self.policy.current
        self.local.add(txn.gid)
        try:
            if txn.decision is None:
                await self._decide(
                    txn, Decision.ABORT, "coordinator lost phase one (deadline or crash)", policy
                )
            await self._settle(txn, policy)
        finally:
            self.local.discard(txn.gid)


class _timed:
    """Observe a phase's duration into the phase histogram."""

    def __init__(self, phase: str) -> None:
        self._phase = phase

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, *_: object) -> None:
        metrics.PHASE_SECONDS.labels(PROTOCOL, self._phase).observe(
            time.perf_counter() - self._start
        )

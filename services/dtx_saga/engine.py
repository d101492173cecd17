"""The saga protocol, run inline for new sagas and by recovery for unfinished ones.

A saga is driven in *rounds*. A round runs the steps forward from the first
one not done — each step one ``Execute`` with the step timeout, retried with
backoff while the error is transient — and logs every result, each save
running alongside the next step's call, so a crashed orchestrator resumes
there or a step before (re-executing a step whose result was not logged is
safe: the participant's barrier answers a repeated Execute with its first
answer). When the saga turns back, the same round compensates every step that
owes it, in reverse order.

How a saga turns back, and when it is parked instead (``recovery.*``):

* a step **refuses** (succeeded=false, or INVALID_ARGUMENT): compensate now;
* the saga's **deadline** passes while it still runs forward, before its
  pivot: compensate;
* a step's call keeps **failing** (its retries ran out; the outcome is
  unknown): the round ends and another one follows after a backoff (inline
  while RunSaga's deadline allows, then by the recovery loop). After
  ``recovery.maxAttempts`` such rounds, ``recovery.onExhausted`` decides:
  ``Abort`` compensates, ``Park`` sets NEEDS_INTERVENTION *still heading
  forward* — a person then retries it (RetrySaga, which also gives it a fresh
  deadline) or turns it back (AbortSaga);
* a **compensation** that keeps failing is retried for
  ``recovery.maxAttempts`` rounds and then parked as NEEDS_INTERVENTION
  (heading backward); one the participant refuses outright is parked at once.
  It is never given up silently and never looped on forever.

**The pivot.** A saga's last step is its pivot, its point of no return (see
``domain``). Once every step before it is done the saga only goes forward:
the pivot's Execute is not bounded by the saga's deadline (each attempt gets
the step timeout, so an inline RunSaga may answer up to one step call with
its retries after the deadline), an unknown outcome of it is retried round
after round — inline while RunSaga's deadline allows, then by recovery,
deadline passed or not — and when ``recovery.maxAttempts`` rounds failed the
saga is parked heading forward, whatever ``recovery.onExhausted`` says. This
holds for a recovering orchestrator too: a saga whose cursor is at the pivot
is executed again, never compensated, because the barrier answers the
repeated Execute with its first answer. Only the pivot's own refusal turns
the saga back from there (the earlier steps are compensated, the pivot is
not), or a person's AbortSaga. Should the pivot's Compensate then be refused
because its effect is final (a confirmed order), the saga completes instead:
nothing had been undone yet (``domain.effects_stand``).

A saga claimed by recovery is driven from its log, which a PostgreSQL crash
can leave several steps behind; when it turns back, every step the log shows
pending is compensated too, the pivot first (``domain.begin_compensation``).
An inline RunSaga drives from memory and skips the steps it never sent.

Every write of a driver is fenced by its lease (see ``storage``): when an
intervention or another replica takes a saga over, the driver's next write
is refused and it stops — RunSaga then waits (bounded) for the saga's end.

Failpoints (``DTX_FAILPOINTS``, for crash tests): ``saga.before_step``,
``saga.after_step`` (after a step's result is known; its save runs with the
next step's call) and
``saga.after_turning_back`` (COMPENSATING logged, no Compensate sent yet).
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence

import grpc

from dtx.v1 import participant_pb2, participant_pb2_grpc, transactions_pb2
from dtx_runtime.coordination.calls import REFUSALS, DeadlinePassed, OnError, call_with_retries
from dtx_runtime.coordination.participants import Participants
from dtx_runtime.coordination.records import Attempt
from dtx_runtime.errors import InvalidArgument, ResourceExhausted, Unavailable
from dtx_runtime.failpoints import failpoint
from dtx_runtime.policy import PolicyHolder, TransactionPolicy
from dtx_saga import metrics
from dtx_saga.domain import (
    Saga,
    State,
    StepRecord,
    StepState,
    Verdict,
    at_pivot,
    backward_verdict,
    begin_compensation,
    compensation_plan,
    complete_past_pivot,
    effects_stand,
    forward_verdict,
    next_forward,
    park,
    records_of,
    validate_steps,
)
from dtx_saga.metrics import PROTOCOL
from dtx_saga.storage import SagaLog

log = logging.getLogger(__name__)

EXISTING_POLL_S = 0.05


class RoundEnd(enum.Enum):
    FINISHED = "finished"  # COMPLETED or COMPENSATED, logged
    PARKED = "parked"  # NEEDS_INTERVENTION, logged
    RETRY = "retry"  # unfinished; another round is due after a backoff
    LOST = "lost"  # the lease was taken over: someone else drives it now


class Engine:
    def __init__(
        self,
        log_: SagaLog,
        policy: PolicyHolder,
        endpoints: Callable[[str], str | None],
        known: Callable[[], Iterable[str]],
        *,
        owner: str,
    ) -> None:
        self.log = log_
        self.policy = policy
        self._endpoints = endpoints
        self._participants = Participants(endpoints)
        self._known = known
        self.owner = owner
        self.local: set[str] = set()  # gids this process is driving now
        self._starting = 0  # RunSaga calls between the in-flight check and the begin record
        self._inline: set[asyncio.Task[RoundEnd]] = set()

    async def close(self) -> None:
        """On shutdown: stop driving, hand the leases back at once, close the channels.

        A saga stopped mid-call loses nothing: its log says where it was, and
        without a lease any replica (or this one restarted) picks it up on its
        next recovery pass instead of after the lease would have run out.
        """
        for task in self._inline:
            task.cancel()
        await asyncio.gather(*self._inline, return_exceptions=True)
        try:
            await self.log.release_leases(self.owner)
        finally:
            await self._participants.close()

    def participants(self) -> list[str]:
        return sorted(n for n in set(self._known()) if self._endpoints(n))

    def _stub(self, participant: str) -> participant_pb2_grpc.ParticipantAsyncStub:
        return self._participants.stub(participant)

    @staticmethod
    def lease_ms(policy: TransactionPolicy) -> int:
        """Long enough for one step call with all its retries, between two writes that renew it.

        Only efficiency hangs on it: writes are fenced, so a driver that
        overruns its lease loses the saga to the next one and stops.
        """
        longest = max([policy.timeouts.step_ms, *(p.timeout_ms or 0 for p in policy.participants)])
        retries = policy.retries
        return max(10_000, retries.max_attempts * (longest + retries.backoff_max_ms) + 5_000)

    # -- inline ------------------------------------------------------------

    async def run(
        self, gid: str, steps: Sequence[transactions_pb2.Branch], timeout_ms: int
    ) -> Saga:
        policy = self.policy.current
        if policy.suspend:
            raise Unavailable("new sagas are suspended by the policy")
        validate_steps(gid, steps, self.participants())
        in_flight = len(self.local) + self._starting
        if in_flight >= policy.max_in_flight:
            raise ResourceExhausted(
                f"{in_flight} sagas in flight; the policy allows {policy.max_in_flight}"
            )
        timeout_ms = timeout_ms or policy.timeouts.transaction_ms
        if timeout_ms < policy.timeouts.step_ms:
            raise InvalidArgument(
                f"timeout_ms: {timeout_ms} is below the step timeout {policy.timeouts.step_ms}"
            )
        if gid in self.local:
            return await self._await_existing(gid, timeout_ms / 1000)
        records = records_of(steps)
        self._starting += 1
        try:
            fresh = await self.log.begin(
                gid,
                records,
                timeout_ms=timeout_ms,
                owner=self.owner,
                lease_ms=timeout_ms + self.lease_ms(policy),
            )
        finally:
            self._starting -= 1
        if not fresh:
            return await self._await_existing(gid, timeout_ms / 1000)
        saga = Saga(gid, State.RUNNING, records, timeout_ms=timeout_ms)
        deadline = time.monotonic() + timeout_ms / 1000
        self.local.add(gid)
        metrics.IN_FLIGHT.labels(PROTOCOL).inc()
        # Shielded: a caller that gives up (its own deadline, a dropped connection)
        # must not leave the saga half-driven until its lease runs out.
        task = asyncio.create_task(self._drive_inline(saga, deadline), name=f"saga:{gid}")
        self._inline.add(task)
        task.add_done_callback(self._inline.discard)
        end = await asyncio.shield(task)
        if end is RoundEnd.LOST:
            log.warning("saga %s was taken over while running; waiting for its end", gid)
            return await self._await_existing(gid, max(1.0, deadline - time.monotonic()))
        return saga

    async def _drive_inline(self, saga: Saga, deadline: float) -> RoundEnd:
        started = time.perf_counter()
        try:
            return await self._drive(saga, deadline=deadline, until=deadline)
        finally:
            self.local.discard(saga.gid)
            metrics.IN_FLIGHT.labels(PROTOCOL).dec()
            metrics.PHASE_SECONDS.labels(PROTOCOL, "total").observe(time.perf_counter() - started)

    async def _await_existing(self, gid: str, timeout_s: float) -> Saga:
        """A repeated RunSaga (or one whose saga was taken over): the logged result, waited for."""
        deadline = time.monotonic() + timeout_s
        while True:
            saga = await self.log.get(gid)
            assert saga is not None
            if saga.state.finished or saga.state is State.NEEDS_INTERVENTION:
                return saga
            if time.monotonic() >= deadline:
                return saga
            await asyncio.sleep(EXISTING_POLL_S)

    # -- recovery ----------------------------------------------------------

    async def drive(self, saga: Saga) -> RoundEnd:
        """One round of a claimed saga; what is left is released to a later pass."""
        self.local.add(saga.gid)
        try:
            deadline = time.monotonic() + (saga.remaining_s or 0.0)
            return await self._drive(saga, deadline=deadline, until=time.monotonic())
        finally:
            self.local.discard(saga.gid)

    # -- rounds ------------------------------------------------------------

    async def _drive(self, saga: Saga, *, deadline: float, until: float) -> RoundEnd:
        """Rounds until the saga finishes, parks or is lost; while ``until`` allows, else hand off."""
        while True:
            policy = self.policy.current
            end, delay_ms = await self._round(saga, policy, deadline)
            if end is not RoundEnd.RETRY:
                return end
            if time.monotonic() + delay_ms / 1000 >= until:
                if not await self.log.release(saga, owner=self.owner, delay_ms=delay_ms):
                    return RoundEnd.LOST
                return RoundEnd.RETRY
            lease = self.lease_ms(policy) + delay_ms
            if not await self.log.save(saga, owner=self.owner, lease_ms=lease):
                return RoundEnd.LOST
            await asyncio.sleep(delay_ms / 1000)

    async def _round(
        self, saga: Saga, policy: TransactionPolicy, deadline: float
    ) -> tuple[RoundEnd, int]:
        if saga.state is State.RUNNING:
            with metrics.PHASE_SECONDS.labels(PROTOCOL, "forward").time():
                forward = await self._forward(saga, policy, deadline)
            if forward is not None:
                return forward
        if saga.state is not State.COMPENSATING:  # pragma: no cover - claimed states only
            raise AssertionError(f"saga {saga.gid} cannot be driven in state {saga.state}")
        with metrics.PHASE_SECONDS.labels(PROTOCOL, "compensate").time():
            return await self._backward(saga, policy)

    async def _forward(
        self, saga: Saga, policy: TransactionPolicy, deadline: float
    ) -> tuple[RoundEnd, int] | None:
        """Run steps forward; None when the saga turned back (the caller compensates)."""
        save_previous: Callable[[], Awaitable[bool]] | None = None
        while (index := next_forward(saga.steps)) is not None:
            step = saga.steps[index]
            # At the pivot the saga only goes forward: the deadline neither turns
            # it back nor bounds the call (see the module docstring).
            pivot = at_pivot(saga.steps)
            if not pivot and time.monotonic() >= deadline:
                return await self._turn_back(
                    saga, policy, f"{step.step}: the saga's deadline passed", "deadline"
                )
            await failpoint("saga.before_step")
            # The previous step's save runs while this step's call is under way:
            # a round trip less per step on the saga's path. A crash between the
            # two leaves the log a step behind, which recovery already expects
            # (``domain.begin_compensation``), and a lost lease still stops this
            # driver one call later, a call the barrier makes harmless.
            result, saved = await asyncio.gather(
                self._execute(saga.gid, step, policy, None if pivot else deadline),
                save_previous() if save_previous is not None else _nothing_to_save(),
            )
            save_previous = None
            if not saved:
                return RoundEnd.LOST, 0
            if result is StepState.DONE:
                # After the last step the COMPLETED write below records it: no save between.
                if next_forward(saga.steps) is not None:
                    save_previous = functools.partial(
                        self.log.save, saga, owner=self.owner, lease_ms=self.lease_ms(policy)
                    )
                await failpoint("saga.after_step")
                continue
            if result is StepState.REFUSED:
                return await self._turn_back(saga, policy, f"{step.step}: {step.reason}", "refused")
            saga.attempts += 1
            late = time.monotonic() >= deadline
            verdict = forward_verdict(
                saga.attempts,
                policy.recovery.max_attempts,
                policy.recovery.on_exhausted,
                deadline_passed=late,
                pivot=pivot,
            )
            if verdict is Verdict.COMPENSATE:
                cause = "deadline" if late else "exhausted"
                return await self._turn_back(saga, policy, f"{step.step}: {step.reason}", cause)
            if verdict is Verdict.PARK:
                rounds = f"after {saga.attempts} rounds"
                if pivot:
                    rounds += "; the pivot: the saga only goes forward"
                return await self._park(saga, f"{step.step}: {step.reason} ({rounds})")
            return RoundEnd.RETRY, policy.retries.backoff_ms(saga.attempts)
        saga.state = State.COMPLETED
        # Durable: a caller is about to be told; a lost COMPLETED could be compensated later.
        if not await self.log.release(saga, owner=self.owner, durable=True):
            return RoundEnd.LOST, 0
        metrics.TRANSACTIONS.labels(PROTOCOL, "completed").inc()
        return RoundEnd.FINISHED, 0

    async def _turn_back(
        self, saga: Saga, policy: TransactionPolicy, reason: str, cause: str
    ) -> tuple[RoundEnd, int] | None:
        begin_compensation(saga, reason)
        # Durable before any Compensate: see storage's docstring.
        if not await self.log.save(
            saga, owner=self.owner, lease_ms=self.lease_ms(policy), durable=True
        ):
            return RoundEnd.LOST, 0
        metrics.COMPENSATIONS.labels(cause).inc()
        log.info("saga %s turns back: %s", saga.gid, saga.reason)
        await failpoint("saga.after_turning_back")
        return None

    async def _backward(self, saga: Saga, policy: TransactionPolicy) -> tuple[RoundEnd, int]:
        for index in compensation_plan(saga.steps):
            step = saga.steps[index]
            failure, definitive, final = await self._compensate(saga.gid, step, policy)
            if final and effects_stand(saga, index):
                complete_past_pivot(saga, f"{step.step}: its effect is final ({failure})")
                log.warning("saga %s cannot be undone: %s", saga.gid, saga.reason)
                metrics.PIVOT_STOOD.inc()
                forward = await self._forward(saga, policy, time.monotonic())
                assert forward is not None  # every step is done: nothing left to turn back
                return forward
            if failure is None:
                step.state = StepState.COMPENSATED
                if not await self.log.save(saga, owner=self.owner, lease_ms=self.lease_ms(policy)):
                    return RoundEnd.LOST, 0
                continue
            saga.attempts += 1
            if (
                backward_verdict(saga.attempts, policy.recovery.max_attempts, definitive=definitive)
                is Verdict.PARK
            ):
                return await self._park(
                    saga, f"{step.step}: {failure} (after {saga.attempts} rounds)"
                )
            return RoundEnd.RETRY, policy.retries.backoff_ms(saga.attempts)
        saga.state = State.COMPENSATED
        if not await self.log.release(saga, owner=self.owner):
            return RoundEnd.LOST, 0
        metrics.TRANSACTIONS.labels(PROTOCOL, "compensated").inc()
        return RoundEnd.FINISHED, 0

    async def _park(self, saga: Saga, reason: str) -> tuple[RoundEnd, int]:
        park(saga, reason)
        if not await self.log.release(saga, owner=self.owner):
            return RoundEnd.LOST, 0
        metrics.TRANSACTIONS.labels(PROTOCOL, "needs_intervention").inc()
        log.error("saga %s needs intervention: %s", saga.gid, reason)
        return RoundEnd.PARKED, 0

    # -- participant calls -------------------------------------------------

    async def _execute(
        self, gid: str, step: StepRecord, policy: TransactionPolicy, deadline: float | None
    ) -> StepState:
        """Execute one step; sets and returns its state (done, refused or failed).

        ``deadline`` bounds the attempts; None (the pivot) gives each the full step timeout.
        """
        request = participant_pb2.ExecuteRequest(
            gid=gid,
            branch=step.step,
            operation=participant_pb2.BranchOperation.FromString(step.operation),
        )

        async def attempt(timeout: float) -> participant_pb2.ExecuteResponse:
            step.attempts += 1
            return await self._stub(step.participant).Execute(request, timeout=timeout)

        started = time.perf_counter()
        try:
            reply = await call_with_retries(
                attempt,
                retries=policy.retries,
                timeout_s=policy.timeout_of(step.participant, policy.timeouts.step_ms),
                deadline=deadline,
                on_error=self._recorder(gid, step, "execute"),
                on_retry=metrics.RETRIES.labels(PROTOCOL, "execute").inc,
            )
        except grpc.aio.AioRpcError as exc:
            detail = f"{exc.code().name}: {exc.details() or ''}".strip(": ")
            if exc.code() in REFUSALS:
                step.state, step.reason = StepState.REFUSED, detail
            else:
                step.state, step.reason = StepState.FAILED, f"execute failed: {detail}"
        except (Unavailable, DeadlinePassed) as exc:
            step.state, step.reason = StepState.FAILED, f"execute failed: {exc}"
        else:
            if reply.succeeded:
                step.state, step.reason = StepState.DONE, ""
            else:
                step.state, step.reason = StepState.REFUSED, reply.reason or "refused"
                await self.log.record_attempts(
                    [Attempt(gid, step.step, "execute", step.attempts, "no", step.reason)]
                )
        finally:
            metrics.STEP_SECONDS.labels("execute").observe(time.perf_counter() - started)
        result = {StepState.DONE: "ok", StepState.REFUSED: "refused"}.get(step.state, "failed")
        metrics.STEPS.labels(step.step, "execute", result).inc()
        return step.state

    async def _compensate(
        self, gid: str, step: StepRecord, policy: TransactionPolicy
    ) -> tuple[str | None, bool, bool]:
        """Compensate one step: (None, ...) when acknowledged, else why it failed.

        Also whether no retry can change the answer (a refusal) and whether the
        participant refused because the step's effect is final (FAILED_PRECONDITION).
        """
        request = participant_pb2.CompensateRequest(gid=gid, branch=step.step)

        async def attempt(timeout: float) -> participant_pb2.CompensateResponse:
            step.attempts += 1
            return await self._stub(step.participant).Compensate(request, timeout=timeout)

        started = time.perf_counter()
        failure: str | None = None
        definitive = final = False
        try:
            await call_with_retries(
                attempt,
                retries=policy.retries,
                timeout_s=policy.timeout_of(step.participant, policy.timeouts.step_ms),
                on_error=self._recorder(gid, step, "compensate"),
                on_retry=metrics.RETRIES.labels(PROTOCOL, "compensate").inc,
            )
        except grpc.aio.AioRpcError as exc:
            detail = f"{exc.code().name}: {exc.details() or ''}".strip(": ")
            failure, definitive = f"compensate failed: {detail}", exc.code() in REFUSALS
            final = exc.code() == grpc.StatusCode.FAILED_PRECONDITION
        except Unavailable as exc:
            failure = f"compensate failed: {exc}"
        finally:
            metrics.STEP_SECONDS.labels("compensate").observe(time.perf_counter() - started)
        metrics.STEPS.labels(step.step, "compensate", "ok" if failure is None else "failed").inc()
        return failure, definitive, final

    def _recorder(self, gid: str, step: StepRecord, action: str) -> OnError:
        async def record(_: int, exc: grpc.aio.AioRpcError) -> None:
            await self.log.record_attempts(
                [
                    Attempt(
                        gid,
                        step.step,
                        action,
                        step.attempts,
                        "error",
                        f"{exc.code().name}: {exc.details() or ''}",
                    )
                ]
            )

        return record


async def _nothing_to_save() -> bool:
    return True

"""The saga orchestrator as a real process, against real payments processes and databases.

The participants are the payments service itself (``dtx serve payments``): a step
is a ``charge`` of an account, its compensation a refund, both behind the
runtime's barrier. Two payments processes with their own databases play two
participants ("payments" and "bank"), so one can be down while the other
answers. Slowness is real too: a test holds a row lock on an account, so the
participant's charge waits on PostgreSQL.

A saga's last step is its pivot: once every step before it is done, the saga
only goes forward (see ``dtx_saga.domain``). Tests that need a saga to turn
back on an unknown outcome therefore put a step after the one that fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from dtx.v1 import (
    participant_pb2,
    payments_pb2,
    payments_pb2_grpc,
    saga_pb2,
    saga_pb2_grpc,
    transactions_pb2,
)
from tests.support.processes import ServiceProcess, free_port
from tests.support.saga_log import LOSE_SAVES

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

T = transactions_pb2

BASE_POLICY: dict[str, Any] = {
    "timeouts": {"stepMs": 1000, "transactionMs": 15_000},
    "retries": {"maxAttempts": 3, "backoffInitialMs": 20, "backoffMaxMs": 100},
    "recovery": {"intervalMs": 200, "maxAttempts": 3, "onExhausted": "Abort"},
}


def merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and key in out else value
    return out


@dataclass
class Rig:
    """The orchestrator and two payments participants, each a process with its own database."""

    run_dir: Path
    new_database: Callable[[str], str]
    policy: dict[str, Any]
    procs: dict[str, ServiceProcess] = field(default_factory=dict)
    dsns: dict[str, str] = field(default_factory=dict)
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    def build(self) -> Rig:
        self.policy_file = self.run_dir / "policy.json"
        self.write_policy(self.policy)
        for name in ("saga", "payments", "bank"):
            self.dsns[name] = self.new_database(name)
        # Coordinator endpoint: nothing listens; no 2PC here, so the reaper never asks.
        dead = f"127.0.0.1:{free_port()}"
        self.procs["payments"] = ServiceProcess(
            "payments",
            {"DTX_DATABASE_URL": self.dsns["payments"], "DTX_COORDINATOR_ENDPOINT": dead},
            self.run_dir / "payments",
        )
        self.procs["bank"] = ServiceProcess(
            "payments",
            {"DTX_DATABASE_URL": self.dsns["bank"], "DTX_COORDINATOR_ENDPOINT": dead},
            self.run_dir / "bank",
        )
        participants = ",".join(f"{n}={self.procs[n].endpoint}" for n in ("payments", "bank"))
        self.procs["saga"] = ServiceProcess(
            "saga",
            {
                "DTX_DATABASE_URL": self.dsns["saga"],
                "DTX_PARTICIPANTS": participants,
                "DTX_POLICY_FILE": str(self.policy_file),
                "DTX_REPLICA_ID": "saga-0",
            },
            self.run_dir / "saga",
        )
        return self

    def start(self, *names: str) -> Rig:
        for name in names or tuple(self.procs):
            self.procs[name].start(wait=False)
        for name in names or tuple(self.procs):
            self.procs[name].wait_ready(60)
        return self

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.process is not None and proc.process.poll() is None:
                try:
                    proc.terminate(15)
                except Exception:
                    proc.kill()

    def write_policy(self, policy: dict[str, Any]) -> None:
        self.policy_file.write_text(json.dumps(policy))

    # -- clients ---------------------------------------------------------------

    def channel(self, name: str) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(self.procs[name].endpoint)
        self.channels.append(channel)
        return channel

    def saga(self, key: str = "saga") -> saga_pb2_grpc.SagaOrchestratorAsyncStub:
        return saga_pb2_grpc.SagaOrchestratorStub(self.channel(key))

    async def close_channels(self) -> None:
        for channel in self.channels:
            await channel.close(grace=None)
        self.channels.clear()

    async def account(self, participant: str, balance: int) -> str:
        stub = payments_pb2_grpc.PaymentsStub(self.channel(participant))
        account = await stub.CreateAccount(
            payments_pb2.CreateAccountRequest(owner="o", currency="EUR", balance_minor=balance),
            timeout=10,
        )
        return account.id

    async def fetch(self, database: str, query: str, *args: Any) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(self.dsns[database], timeout=10)
        try:
            return list(await conn.fetch(query, *args))
        finally:
            await conn.close()

    async def balance(self, participant: str, account: str) -> int:
        [row] = await self.fetch(
            participant, "SELECT balance_minor FROM accounts WHERE id = $1::uuid", account
        )
        return int(row["balance_minor"])

    async def ledger(self, participant: str, gid: str) -> list[tuple[str, str, int]]:
        rows = await self.fetch(
            participant,
            "SELECT branch, kind, amount_minor FROM ledger WHERE gid = $1 ORDER BY id",
            gid,
        )
        return [(r["branch"], r["kind"], r["amount_minor"]) for r in rows]

    async def get(self, gid: str, key: str = "saga") -> transactions_pb2.Transaction:
        return await self.saga(key).GetSaga(T.GetTransactionRequest(gid=gid), timeout=10)

    async def wait_for(
        self, gid: str, states: set[int], *, timeout: float = 40, key: str = "saga"
    ) -> transactions_pb2.Transaction:
        """Poll GetSaga until the saga is in one of ``states``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last: transactions_pb2.Transaction | None = None
        while loop.time() < deadline:
            with contextlib.suppress(grpc.aio.AioRpcError):
                last = await self.get(gid, key)
                if last.state in states:
                    return last
            await asyncio.sleep(0.1)
        raise AssertionError(f"saga {gid} did not reach {states} in {timeout} s; last: {last}")

    async def wait_log(self, query: str, *args: Any, timeout: float = 30) -> None:
        """Poll the saga's database until ``query`` returns a row."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if await self.fetch("saga", query, *args):
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out waiting for {query}")

    def metrics(self) -> str:
        with urllib.request.urlopen(f"{self.procs['saga'].http}/metrics", timeout=5) as reply:
            return str(reply.read().decode())

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.procs['saga'].http}/status", timeout=5) as reply:
            data: dict[str, Any] = json.loads(reply.read())
            return data


def charge(name: str, participant: str, account: str, amount: int) -> transactions_pb2.Branch:
    return T.Branch(
        branch=name,
        participant=participant,
        operation=participant_pb2.BranchOperation(
            charge=participant_pb2.ChargeOperation(
                account_id=account, amount_minor=amount, currency="EUR", order_id="o-1"
            )
        ),
    )


async def two_charges(
    rig: Rig, *, bank_balance: int = 1_000
) -> tuple[str, str, list[transactions_pb2.Branch]]:
    """Accounts a (payments, 1,000) and b (bank), and the saga: 300 from a, then 200 from b."""
    a = await rig.account("payments", 1_000)
    b = await rig.account("bank", bank_balance)
    return a, b, [charge("pay-a", "payments", a, 300), charge("pay-b", "bank", b, 200)]


async def run(
    rig: Rig, gid: str, steps: list[transactions_pb2.Branch], *, timeout_ms: int = 0
) -> transactions_pb2.Transaction:
    reply = await rig.saga().RunSaga(
        saga_pb2.RunSagaRequest(gid=gid, steps=steps, timeout_ms=timeout_ms), timeout=60
    )
    return reply.saga


@contextlib.asynccontextmanager
async def row_locked(rig: Rig, participant: str, account: str) -> AsyncIterator[None]:
    """Hold the account's row lock: the participant's charge of it waits on PostgreSQL."""
    conn = await asyncpg.connect(rig.dsns[participant], timeout=10)
    try:
        tx = conn.transaction()
        await tx.start()
        await conn.execute("SELECT 1 FROM accounts WHERE id = $1::uuid FOR UPDATE", account)
        try:
            yield
        finally:
            await tx.rollback()
    finally:
        await conn.close()


def steps_of(saga: transactions_pb2.Transaction) -> dict[str, str]:
    return {b.branch: b.state for b in saga.branches}


async def interventions(rig: Rig, gid: str) -> list[tuple[str, str, str, str, str]]:
    rows = await rig.fetch(
        "saga",
        "SELECT action, actor, reason, from_state, to_state FROM interventions"
        " WHERE gid = $1 ORDER BY id",
        gid,
    )
    return [(r["action"], r["actor"], r["reason"], r["from_state"], r["to_state"]) for r in rows]


@pytest.fixture
async def rig(run_dir: Path, new_database: Callable[[str], str]) -> AsyncIterator[Rig]:
    system = Rig(run_dir, new_database, BASE_POLICY).build()
    try:
        system.start()
        yield system
    finally:
        await system.close_channels()
        system.stop()


# -- the happy path and refusals ---------------------------------------------------------


async def test_a_saga_completes_and_a_repeat_returns_the_first_result(rig: Rig) -> None:
    a, b, steps = await two_charges(rig)
    saga = await run(rig, "happy-1", steps)
    assert saga.state == T.TRANSACTION_STATE_COMPLETED
    assert saga.outcome == T.OUTCOME_COMMITTED
    assert saga.protocol == 2  # PROTOCOL_SAGA
    assert steps_of(saga) == {"pay-a": "done", "pay-b": "done"}
    assert (await rig.balance("payments", a), await rig.balance("bank", b)) == (700, 800)

    again = await run(rig, "happy-1", steps)
    assert again.state == T.TRANSACTION_STATE_COMPLETED
    assert (await rig.balance("payments", a), await rig.balance("bank", b)) == (700, 800)
    assert await rig.ledger("payments", "happy-1") == [("pay-a", "charge", -300)]

    listed = await rig.saga().ListSagas(
        T.ListTransactionsRequest(state=T.TRANSACTION_STATE_COMPLETED), timeout=10
    )
    assert [t.gid for t in listed.transactions] == ["happy-1"]
    none = await rig.saga().ListSagas(
        T.ListTransactionsRequest(state=T.TRANSACTION_STATE_COMMITTED), timeout=10
    )
    assert list(none.transactions) == []
    [row] = await rig.fetch("saga", "SELECT state, current_step, finished_at FROM sagas")
    assert (row["state"], row["current_step"]) == ("COMPLETED", 2)
    assert row["finished_at"] is not None

    text = rig.metrics()
    assert 'dtx_transactions_total{outcome="completed",protocol="saga"} 1.0' in text
    assert 'dtx_saga_steps_total{action="execute",result="ok",step="pay-a"} 1.0' in text
    assert "dtx_saga_step_seconds_bucket" in text
    assert len(rig.status()["policyHash"]) == 16


async def test_a_refusal_at_step_two_compensates_step_one(rig: Rig) -> None:
    a = await rig.account("payments", 1_000)
    b = await rig.account("bank", 100)
    c = await rig.account("payments", 1_000)
    steps = [
        charge("pay-a", "payments", a, 300),
        charge("pay-b", "bank", b, 200),
        charge("pay-c", "payments", c, 1),
    ]
    saga = await run(rig, "refused-1", steps)
    assert saga.state == T.TRANSACTION_STATE_COMPENSATED
    assert saga.outcome == T.OUTCOME_ABORTED
    assert saga.reason.startswith("pay-b: insufficient funds"), saga.reason
    assert steps_of(saga) == {"pay-a": "compensated", "pay-b": "refused", "pay-c": "skipped"}
    assert await rig.balance("payments", a) == 1_000
    assert await rig.balance("bank", b) == 100
    assert await rig.balance("payments", c) == 1_000
    assert await rig.ledger("payments", "refused-1") == [
        ("pay-a", "charge", -300),
        ("pay-a", "refund", 300),
    ]
    # The refused step was not compensated: no call went to it.
    barrier = await rig.fetch(
        "bank", "SELECT op, outcome FROM dtx_barrier WHERE gid = $1", "refused-1"
    )
    assert [(r["op"], r["outcome"]) for r in barrier] == [("action", "no")]
    detail = await rig.get("refused-1")
    [attempt] = [a for b in detail.branches for a in b.attempts]
    assert (attempt.action, attempt.result) == ("execute", "no")
    assert 'dtx_saga_compensations_total{cause="refused"} 1.0' in rig.metrics()


async def test_bad_requests_are_refused_before_anything_is_logged(rig: Rig) -> None:
    a = await rig.account("payments", 1_000)
    saga = rig.saga()
    cases: list[tuple[saga_pb2.RunSagaRequest, str]] = [
        (saga_pb2.RunSagaRequest(gid="bad gid", steps=[charge("x", "payments", a, 1)]), "gid"),
        (saga_pb2.RunSagaRequest(gid="g1"), "steps"),
        (
            saga_pb2.RunSagaRequest(
                gid="g1", steps=[charge("x", "payments", a, 1), charge("x", "payments", a, 1)]
            ),
            "steps[1].branch",
        ),
        (
            saga_pb2.RunSagaRequest(gid="g1", steps=[charge("x", "nowhere", a, 1)]),
            "steps[0].participant",
        ),
        (
            saga_pb2.RunSagaRequest(gid="g1", steps=[charge("x", "payments", a, 1)], timeout_ms=5),
            "timeout_ms",
        ),
    ]
    for request, field_name in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await saga.RunSaga(request, timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field_name in (caught.value.details() or "")
    assert await rig.fetch("saga", "SELECT gid FROM sagas") == []
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await rig.get("nope")
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as too_many:
        await saga.ListSagas(T.ListTransactionsRequest(limit=501), timeout=10)
    assert too_many.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_malformed_operation_is_a_refusal(rig: Rig) -> None:
    a = await rig.account("payments", 1_000)
    b = await rig.account("bank", 1_000)
    bad = charge("pay-b", "bank", b, 0)  # amount must be positive: INVALID_ARGUMENT
    saga = await run(rig, "invalid-1", [charge("pay-a", "payments", a, 10), bad])
    # A refusal of the pivot (the last step) still turns the saga back; the
    # pivot said no, so only the steps before it are compensated.
    assert saga.state == T.TRANSACTION_STATE_COMPENSATED
    assert "pay-b: INVALID_ARGUMENT" in saga.reason
    assert steps_of(saga) == {"pay-a": "compensated", "pay-b": "refused"}
    assert await rig.balance("payments", a) == 1_000


# -- crashes -------------------------------------------------------------------------------


async def test_orchestrator_killed_during_a_slow_step_resumes_and_completes(rig: Rig) -> None:
    a, b, steps = await two_charges(rig)
    orchestrator = rig.procs["saga"]
    async with row_locked(rig, "bank", b):
        running = asyncio.create_task(run(rig, "crash-1", steps))
        await rig.wait_log("SELECT 1 FROM sagas WHERE steps->0->>'state' = 'done'")
        await asyncio.sleep(0.5)  # pay-b's charge now waits on the row lock in the bank
        orchestrator.kill()
        with pytest.raises(grpc.aio.AioRpcError):
            await running
        [row] = await rig.fetch("saga", "SELECT state FROM sagas WHERE gid = 'crash-1'")
        assert row["state"] == "RUNNING"
    orchestrator.start()  # same replica id: its predecessor's lease is taken at once
    saga = await rig.wait_for(
        "crash-1", {T.TRANSACTION_STATE_COMPLETED, T.TRANSACTION_STATE_COMPENSATED}
    )
    assert saga.state == T.TRANSACTION_STATE_COMPLETED, saga
    assert (await rig.balance("payments", a), await rig.balance("bank", b)) == (700, 800)
    assert await rig.ledger("payments", "crash-1") == [("pay-a", "charge", -300)]
    assert await rig.ledger("bank", "crash-1") == [("pay-b", "charge", -200)]


async def test_another_replica_takes_over_when_the_lease_runs_out(rig: Rig) -> None:
    second = ServiceProcess(
        "saga", {**rig.procs["saga"].env, "DTX_REPLICA_ID": "saga-1"}, rig.run_dir / "saga-1"
    )
    rig.procs["saga-1"] = second
    second.start()
    a, b, steps = await two_charges(rig)
    async with row_locked(rig, "bank", b):
        running = asyncio.create_task(run(rig, "replica-1", steps))
        await rig.wait_log("SELECT 1 FROM sagas WHERE steps->0->>'state' = 'done'")
        rig.procs["saga"].kill()  # for good: only the other replica is left
        with pytest.raises(grpc.aio.AioRpcError):
            await running
    [row] = await rig.fetch("saga", "SELECT lease_owner FROM sagas")
    assert row["lease_owner"].startswith("saga-0/")
    saga = await rig.wait_for(
        "replica-1", {T.TRANSACTION_STATE_COMPLETED}, timeout=60, key="saga-1"
    )
    assert steps_of(saga) == {"pay-a": "done", "pay-b": "done"}
    assert (await rig.balance("payments", a), await rig.balance("bank", b)) == (700, 800)
    assert "recovered 1 saga transactions" in second.log_path.read_text()


async def test_orchestrator_stopped_gracefully_hands_its_saga_back(rig: Rig) -> None:
    a, b, steps = await two_charges(rig)
    orchestrator = rig.procs["saga"]
    async with row_locked(rig, "bank", b):
        running = asyncio.create_task(run(rig, "stop-1", steps))
        await rig.wait_log("SELECT 1 FROM sagas WHERE steps->0->>'state' = 'done'")
        assert orchestrator.terminate() == 0  # SIGTERM: drain, stop driving, release leases
        with pytest.raises(grpc.aio.AioRpcError):
            await running
        [row] = await rig.fetch("saga", "SELECT state, lease_owner FROM sagas")
        assert (row["state"], row["lease_owner"]) == ("RUNNING", None)
    orchestrator.start()
    saga = await rig.wait_for("stop-1", {T.TRANSACTION_STATE_COMPLETED})
    assert steps_of(saga) == {"pay-a": "done", "pay-b": "done"}
    assert (await rig.balance("payments", a), await rig.balance("bank", b)) == (700, 800)


async def test_orchestrator_killed_past_the_deadline_compensates_on_restart(rig: Rig) -> None:
    a = await rig.account("payments", 1_000)
    b = await rig.account("bank", 1_000)
    # pay-b is not the pivot (pay-c is): past the deadline, the saga still turns back.
    steps = [
        charge("pay-a", "payments", a, 300),
        charge("pay-b", "bank", b, 200),
        charge("pay-c", "payments", a, 100),
    ]
    orchestrator = rig.procs["saga"]
    async with row_locked(rig, "bank", b):
        running = asyncio.create_task(run(rig, "crash-2", steps, timeout_ms=2_000))
        await rig.wait_log("SELECT 1 FROM sagas WHERE steps->0->>'state' = 'done'")
        orchestrator.kill()
        with pytest.raises(grpc.aio.AioRpcError):
            await running
        await asyncio.sleep(2.0)  # the deadline passes while nobody drives the saga
        orchestrator.start()
        saga = await rig.wait_for(
            "crash-2", {T.TRANSACTION_STATE_COMPLETED, T.TRANSACTION_STATE_COMPENSATED}
        )
    assert saga.state == T.TRANSACTION_STATE_COMPENSATED, saga
    assert saga.reason == "pay-b: the saga's deadline passed"
    # Driven from the log, which may lag: pay-c, never sent, is compensated too.
    assert steps_of(saga) == {
        "pay-a": "compensated",
        "pay-b": "compensated",
        "pay-c": "compensated",
    }
    assert (await rig.balance("payments", a), await rig.balance("bank", b)) == (1_000, 1_000)
    # pay-b's outcome was unknown: it got a Compensate, which found nothing to undo.
    assert await rig.ledger("bank", "crash-2") == []
    # pay-c never ran: its Compensate was a recorded no-op.
    barrier = await rig.fetch(
        "payments",
        "SELECT op, outcome FROM dtx_barrier WHERE gid = $1 AND branch = 'pay-c' ORDER BY op",
        "crash-2",
    )
    assert [(r["op"], r["outcome"]) for r in barrier] == [
        ("action", "compensated"),
        ("compensate", "noop"),
    ]


async def test_a_log_that_lost_several_steps_compensates_the_hidden_ones(rig: Rig) -> None:
    a = await rig.account("payments", 1_000)
    b = await rig.account("bank", 1_000)
    c = await rig.account("payments", 1_000)
    steps = [
        charge("pay-a", "payments", a, 300),
        charge("pay-b", "bank", b, 200),
        charge("pay-c", "payments", c, 100),
    ]
    saga = await run(rig, "lag-1", steps)
    assert saga.state == T.TRANSACTION_STATE_COMPLETED
    # Every step ran, but the log read back shows only pay-a: the cursor before the pivot.
    assert await rig.fetch("saga", LOSE_SAVES, "lag-1", 1)
    saga = await rig.wait_for(
        "lag-1",
        {
            T.TRANSACTION_STATE_COMPLETED,
            T.TRANSACTION_STATE_COMPENSATED,
            T.TRANSACTION_STATE_NEEDS_INTERVENTION,
        },
    )
    assert saga.state == T.TRANSACTION_STATE_COMPENSATED, saga
    assert saga.reason == "pay-b: the saga's deadline passed"
    assert steps_of(saga) == {
        "pay-a": "compensated",
        "pay-b": "compensated",
        "pay-c": "compensated",
    }
    # The hidden steps, pivot included, were undone too: nobody is left charged.
    assert (
        await rig.balance("payments", a),
        await rig.balance("bank", b),
        await rig.balance("payments", c),
    ) == (1_000, 1_000, 1_000)
    assert await rig.ledger("bank", "lag-1") == [
        ("pay-b", "charge", -200),
        ("pay-b", "refund", 200),
    ]
    assert await rig.ledger("payments", "lag-1") == [
        ("pay-a", "charge", -300),
        ("pay-c", "charge", -100),
        ("pay-c", "refund", 100),
        ("pay-a", "refund", 300),
    ]


async def test_orchestrator_killed_at_the_pivot_past_the_deadline_completes_on_restart(
    rig: Rig,
) -> None:
    a = await rig.account("payments", 1_000)
    b = await rig.account("bank", 1_000)
    # pay-b is the pivot: once pay-a is done, the saga only goes forward.
    steps = [charge("pay-a", "payments", a, 300), charge("pay-b", "bank", b, 200)]
    orchestrator = rig.procs["saga"]
    async with row_locked(rig, "bank", b):
        running = asyncio.create_task(run(rig, "pivot-1", steps, timeout_ms=2_000))
        await rig.wait_log("SELECT 1 FROM sagas WHERE steps->0->>'state' = 'done'")
        await asyncio.sleep(0.3)  # pay-b's charge was sent: it waits on the row lock
        orchestrator.kill()
        with pytest.raises(grpc.aio.AioRpcError):
            await running
        await asyncio.sleep(2.0)  # the deadline passes while nobody drives the saga
    [row] = await rig.fetch("saga", "SELECT state, deadline < now() AS late FROM sagas")
    assert (row["state"], row["late"]) == ("RUNNING", True)
    orchestrator.start()  # recovery finds the cursor at the pivot, past the deadline
    saga = await rig.wait_for(
        "pivot-1", {T.TRANSACTION_STATE_COMPLETED, T.TRANSACTION_STATE_COMPENSATED}
    )
    assert saga.state == T.TRANSACTION_STATE_COMPLETED, saga
    assert steps_of(saga) == {"pay-a": "done", "pay-b": "done"}
    assert (await rig.balance("payments", a), await rig.balance("bank", b)) == (700, 800)
    assert await rig.ledger("payments", "pivot-1") == [("pay-a", "charge", -300)]
    assert await rig.ledger("bank", "pivot-1") == [("pay-b", "charge", -200)]
    assert "dtx_saga_compensations_total{" not in rig.metrics()


async def test_a_pivot_slower_than_the_deadline_is_retried_until_it_answers(rig: Rig) -> None:
    a, b, steps = await two_charges(rig)
    async with row_locked(rig, "bank", b):
        running = asyncio.create_task(run(rig, "pivot-2", steps, timeout_ms=2_000))
        await rig.wait_log("SELECT 1 FROM sagas WHERE steps->0->>'state' = 'done'")
        # Every Execute of pay-b times out (step timeout 1 s) until well past the deadline.
        await rig.wait_log(
            "SELECT 1 FROM sagas WHERE deadline < now() - interval '1 second' AND attempts >= 1"
        )
        [row] = await rig.fetch("saga", "SELECT state, direction, steps FROM sagas")
        assert (row["state"], row["direction"]) == ("RUNNING", "forward")
        assert json.loads(row["steps"])[0]["state"] == "done"
        # RunSaga answers once its deadline is over: still running, handed to recovery.
        answered = await running
        assert answered.state == T.TRANSACTION_STATE_RUNNING, answered
    saga = await rig.wait_for(
        "pivot-2", {T.TRANSACTION_STATE_COMPLETED, T.TRANSACTION_STATE_COMPENSATED}
    )
    assert saga.state == T.TRANSACTION_STATE_COMPLETED, saga
    assert steps_of(saga) == {"pay-a": "done", "pay-b": "done"}
    assert (await rig.balance("payments", a), await rig.balance("bank", b)) == (700, 800)
    assert await rig.ledger("bank", "pivot-2") == [("pay-b", "charge", -200)]
    timeouts = await rig.fetch(
        "saga",
        "SELECT count(*) AS n FROM saga_attempts WHERE step = 'pay-b' AND action = 'execute'"
        " AND detail LIKE 'DEADLINE_EXCEEDED%'",
    )
    assert timeouts[0]["n"] >= 3  # at least one round of the step's retries timed out
    assert "dtx_saga_compensations_total{" not in rig.metrics()


async def test_orchestrator_killed_while_compensating_finishes_compensating(
    run_dir: Path, new_database: Callable[[str], str]
) -> None:
    rig = Rig(run_dir, new_database, BASE_POLICY).build()
    orchestrator = rig.procs["saga"]
    orchestrator.env["DTX_FAILPOINTS"] = "saga.after_turning_back=kill"
    try:
        rig.start()
        a, _, steps = await two_charges(rig, bank_balance=100)
        with pytest.raises(grpc.aio.AioRpcError):
            await run(rig, "crash-3", steps)
        assert orchestrator.process is not None
        assert orchestrator.process.wait(10) == -9
        [row] = await rig.fetch("saga", "SELECT state, steps FROM sagas")
        assert row["state"] == "COMPENSATING"
        assert await rig.balance("payments", a) == 700  # nothing compensated yet
        del orchestrator.env["DTX_FAILPOINTS"]
        orchestrator.start()
        saga = await rig.wait_for("crash-3", {T.TRANSACTION_STATE_COMPENSATED})
        assert saga.reason.startswith("pay-b: insufficient funds")
        assert steps_of(saga) == {"pay-a": "compensated", "pay-b": "refused"}
        assert await rig.balance("payments", a) == 1_000
        assert await rig.ledger("payments", "crash-3") == [
            ("pay-a", "charge", -300),
            ("pay-a", "refund", 300),
        ]
    finally:
        await rig.close_channels()
        rig.stop()


# -- a participant down --------------------------------------------------------------------


async def _rig_with_bank_down(
    run_dir: Path, new_database: Callable[[str], str], extra: dict[str, Any]
) -> tuple[Rig, str, str]:
    """Everything up, an account in each participant; then the bank goes down."""
    rig = Rig(run_dir, new_database, merged(BASE_POLICY, extra)).build()
    try:
        rig.start()
        a = await rig.account("payments", 1_000)
        b = await rig.account("bank", 1_000)
        await rig.close_channels()
        rig.procs["bank"].terminate()
    except BaseException:
        await rig.close_channels()
        rig.stop()
        raise
    return rig, a, b


async def _bank_back(rig: Rig) -> None:
    rig.start("bank")
    # The orchestrator's channel reconnects within its capped backoff (1 s).
    await asyncio.sleep(1.5)


async def test_participant_down_with_abort_compensates_then_parks_until_it_is_back(
    run_dir: Path, new_database: Callable[[str], str]
) -> None:
    rig, a, b = await _rig_with_bank_down(
        run_dir, new_database, {"recovery": {"onExhausted": "Abort", "maxAttempts": 2}}
    )
    try:
        # pay-c is the pivot; pay-b, before it, may still turn the saga back.
        steps = [
            charge("pay-a", "payments", a, 300),
            charge("pay-b", "bank", b, 200),
            charge("pay-c", "payments", a, 100),
        ]
        saga = await run(rig, "down-1", steps)
        # Forward: pay-b's retries ran out twice (2 rounds x 3 attempts) -> Abort: turn back.
        # Backward, in reverse order: pay-b's compensation cannot reach the bank either;
        # after 2 rounds it is parked rather than retried forever.
        if saga.state != T.TRANSACTION_STATE_NEEDS_INTERVENTION:
            saga = await rig.wait_for("down-1", {T.TRANSACTION_STATE_NEEDS_INTERVENTION})
        assert saga.outcome == T.OUTCOME_PENDING
        assert saga.reason.startswith("pay-b: compensate failed: UNAVAILABLE"), saga.reason
        assert steps_of(saga) == {"pay-a": "done", "pay-b": "failed", "pay-c": "skipped"}
        [row] = await rig.fetch("saga", "SELECT reason, direction FROM sagas")
        assert row["direction"] == "backward"
        assert row["reason"].startswith("pay-b: execute failed: UNAVAILABLE")
        # Compensation is strictly in reverse: pay-a waits for pay-b.
        assert await rig.balance("payments", a) == 700
        calls = await rig.fetch(
            "saga", "SELECT action, count(*) AS n FROM saga_attempts GROUP BY action"
        )
        assert {r["action"]: r["n"] for r in calls} == {"execute": 6, "compensate": 6}

        # Nothing happens by itself now: no silent loop.
        await asyncio.sleep(1.0)
        assert (await rig.get("down-1")).state == T.TRANSACTION_STATE_NEEDS_INTERVENTION

        await _bank_back(rig)
        with pytest.raises(grpc.aio.AioRpcError) as nameless:
            await rig.saga().RetrySaga(T.InterveneRequest(gid="down-1", reason="x"), timeout=10)
        assert nameless.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        retried = await rig.saga().RetrySaga(
            T.InterveneRequest(gid="down-1", actor="alice", reason="bank is back"), timeout=10
        )
        assert retried.state == T.TRANSACTION_STATE_COMPENSATING
        assert retried.attempts == 0
        saga = await rig.wait_for("down-1", {T.TRANSACTION_STATE_COMPENSATED})
        assert saga.reason.startswith("pay-b: execute failed: UNAVAILABLE")
        assert steps_of(saga) == {
            "pay-a": "compensated",
            "pay-b": "compensated",
            "pay-c": "skipped",
        }
        assert await rig.balance("payments", a) == 1_000
        assert await rig.balance("bank", b) == 1_000
        assert await interventions(rig, "down-1") == [
            ("retry", "alice", "bank is back", "NEEDS_INTERVENTION", "COMPENSATING")
        ]
        # The bank never ran pay-b: its compensation was a recorded no-op.
        barrier = await rig.fetch("bank", "SELECT op, outcome FROM dtx_barrier ORDER BY op")
        assert [(r["op"], r["outcome"]) for r in barrier] == [
            ("action", "compensated"),
            ("compensate", "noop"),
        ]
        with pytest.raises(grpc.aio.AioRpcError) as again:
            await rig.saga().RetrySaga(
                T.InterveneRequest(gid="down-1", actor="alice", reason="again"), timeout=10
            )
        assert again.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        text = rig.metrics()
        assert 'dtx_transactions_total{outcome="needs_intervention",protocol="saga"} 1.0' in text
        assert 'dtx_saga_compensations_total{cause="exhausted"} 1.0' in text
    finally:
        await rig.close_channels()
        rig.stop()


@pytest.mark.parametrize("on_exhausted", ["Park", "Abort"])
async def test_participant_down_at_the_pivot_waits_forward_for_a_person(
    run_dir: Path, new_database: Callable[[str], str], on_exhausted: str
) -> None:
    rig, a, b = await _rig_with_bank_down(
        run_dir, new_database, {"recovery": {"onExhausted": on_exhausted, "maxAttempts": 2}}
    )
    try:
        # pay-b is the pivot: when its rounds run out the saga is parked heading
        # forward, even when the policy says Abort.
        saga = await run(
            rig, "down-2", [charge("pay-a", "payments", a, 300), charge("pay-b", "bank", b, 1)]
        )
        if saga.state != T.TRANSACTION_STATE_NEEDS_INTERVENTION:
            saga = await rig.wait_for("down-2", {T.TRANSACTION_STATE_NEEDS_INTERVENTION})
        assert steps_of(saga) == {"pay-a": "done", "pay-b": "failed"}
        assert "pay-b: execute failed: UNAVAILABLE" in saga.reason
        assert "(after 2 rounds; the pivot: the saga only goes forward)" in saga.reason
        [row] = await rig.fetch("saga", "SELECT direction FROM sagas")
        assert row["direction"] == "forward"
        assert await rig.balance("payments", a) == 700  # still forward: nothing undone
        assert "dtx_saga_compensations_total{" not in rig.metrics()

        # The bank comes back; a person sends the saga on (a fresh deadline with it).
        await _bank_back(rig)
        retried = await rig.saga().RetrySaga(
            T.InterveneRequest(gid="down-2", actor="bob", reason="bank restored"), timeout=10
        )
        assert retried.state == T.TRANSACTION_STATE_RUNNING
        saga = await rig.wait_for("down-2", {T.TRANSACTION_STATE_COMPLETED})
        assert steps_of(saga) == {"pay-a": "done", "pay-b": "done"}
        assert (await rig.balance("payments", a), await rig.balance("bank", b)) == (700, 999)
        assert await interventions(rig, "down-2") == [
            ("retry", "bob", "bank restored", "NEEDS_INTERVENTION", "RUNNING")
        ]
        with pytest.raises(grpc.aio.AioRpcError) as finished:
            await rig.saga().AbortSaga(
                T.InterveneRequest(gid="down-2", actor="bob", reason="too late"), timeout=10
            )
        assert finished.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        await rig.close_channels()
        rig.stop()


# -- interventions -------------------------------------------------------------------------


async def test_abort_of_a_running_saga_compensates_what_ran(rig: Rig) -> None:
    a, b, steps = await two_charges(rig)
    async with row_locked(rig, "bank", b):
        running = asyncio.create_task(run(rig, "abort-1", steps))
        await rig.wait_log("SELECT 1 FROM sagas WHERE steps->0->>'state' = 'done'")
        aborted = await rig.saga().AbortSaga(
            T.InterveneRequest(gid="abort-1", actor="carol", reason="customer cancelled"),
            timeout=10,
        )
        assert aborted.state == T.TRANSACTION_STATE_COMPENSATING
    # The lock is gone: pay-b's late charge runs or is refused; either way it is undone.
    saga = await running  # RunSaga answers the end, even though recovery finished it
    assert saga.state == T.TRANSACTION_STATE_COMPENSATED, saga
    assert saga.reason == "aborted by carol: customer cancelled"
    assert (await rig.balance("payments", a), await rig.balance("bank", b)) == (1_000, 1_000)
    assert await interventions(rig, "abort-1") == [
        ("abort", "carol", "customer cancelled", "RUNNING", "COMPENSATING")
    ]
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await rig.saga().AbortSaga(
            T.InterveneRequest(gid="abort-1", actor="carol", reason="twice"), timeout=10
        )
    assert again.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_abort_of_an_unknown_gid_leaves_a_tombstone(rig: Rig) -> None:
    a = await rig.account("payments", 1_000)
    with pytest.raises(grpc.aio.AioRpcError) as reasonless:
        await rig.saga().AbortSaga(T.InterveneRequest(gid="ghost-1", actor="rec"), timeout=10)
    assert reasonless.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    dead = await rig.saga().AbortSaga(
        T.InterveneRequest(gid="ghost-1", actor="reconciler", reason="order never started"),
        timeout=10,
    )
    assert dead.state == T.TRANSACTION_STATE_COMPENSATED
    assert dead.outcome == T.OUTCOME_ABORTED
    # The late RunSaga finds it compensated and runs nothing.
    late = await run(rig, "ghost-1", [charge("pay-a", "payments", a, 300)])
    assert late.state == T.TRANSACTION_STATE_COMPENSATED
    assert await rig.balance("payments", a) == 1_000
    assert await interventions(rig, "ghost-1") == [
        ("abort", "reconciler", "order never started", "UNKNOWN", "COMPENSATED")
    ]


# -- policy: suspend, in-flight limit ---------------------------------------------------------


async def test_policy_suspend_and_in_flight_limit(rig: Rig) -> None:
    a = await rig.account("payments", 1_000)
    b = await rig.account("bank", 1_000)
    hash_before = rig.status()["policyHash"]
    rig.write_policy(merged(rig.policy, {"maxInFlight": 1}))
    await _wait(lambda: rig.status()["policyHash"] != hash_before, "the policy reload")
    async with row_locked(rig, "bank", b):
        running = asyncio.create_task(
            run(rig, "busy-1", [charge("pay-b", "bank", b, 1)], timeout_ms=5_000)
        )
        await rig.wait_log("SELECT 1 FROM sagas WHERE gid = 'busy-1'")
        with pytest.raises(grpc.aio.AioRpcError) as busy:
            await run(rig, "busy-2", [charge("pay-a", "payments", a, 1)])
        assert busy.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (await running).state == T.TRANSACTION_STATE_COMPLETED

    hash_before = rig.status()["policyHash"]
    rig.write_policy(merged(rig.policy, {"suspend": True}))
    await _wait(lambda: rig.status()["policyHash"] != hash_before, "the policy reload")
    with pytest.raises(grpc.aio.AioRpcError) as suspended:
        await run(rig, "busy-3", [charge("pay-a", "payments", a, 1)])
    assert suspended.value.code() == grpc.StatusCode.UNAVAILABLE
    assert await rig.balance("payments", a) == 1_000


async def _wait(condition: Callable[[], bool | Awaitable[bool]], what: str) -> None:
    for _ in range(100):
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")

"""The shared service lifecycle, on a real process: serve, observe, drain on SIGTERM, refuse bad starts.

The service is the test-only :mod:`tests.support.sleepy_service` (``dtx.v1.Payments``
whose ``GetAccount`` sleeps ``account_id`` seconds), run by ``tests/support/run_service.py``
exactly as ``dtx serve`` runs the real services.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from prometheus_client.parser import text_string_to_metric_families

from dtx.v1 import payments_pb2, payments_pb2_grpc
from tests.support.processes import ServiceProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]
RUN_SERVICE = ROOT / "tests" / "support" / "run_service.py"
SLEEPY = "tests.support.sleepy_service"
GRACE_SECONDS = 5.0


def sleepy_process(dsn: str, log_dir: Path, **env: str) -> ServiceProcess:
    return ServiceProcess(
        "sleepy",
        {"DTX_DATABASE_URL": dsn, "DTX_SHUTDOWN_GRACE_SECONDS": f"{GRACE_SECONDS:g}", **env},
        log_dir,
        argv=[sys.executable, str(RUN_SERVICE), SLEEPY],
    )


@pytest.fixture
def sleepy_dsn(new_database: Callable[[str], str]) -> str:
    return new_database("sleepy")


@pytest.fixture
def sleepy(sleepy_dsn: str, run_dir: Path) -> Iterator[ServiceProcess]:
    proc = sleepy_process(sleepy_dsn, run_dir)
    try:
        yield proc.start(timeout=60)
    finally:
        proc.kill()


def http_get(url: str, timeout: float = 5) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def run_once(env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the service in the foreground with ``env`` on top of ours; it is expected to exit."""
    return subprocess.run(
        [sys.executable, str(RUN_SERVICE), SLEEPY],
        env={**os.environ, "DTX_BIND_HOST": "127.0.0.1", **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


async def wait_in_handler(proc: ServiceProcess, account_id: str, timeout: float = 15) -> None:
    """Until the service logged that the call for ``account_id`` is sleeping in its handler."""
    needle = f'"account_id": "{account_id}"'
    deadline = time.monotonic() + timeout
    while True:
        text = proc.log_path.read_text(errors="replace") if proc.log_path.exists() else ""
        if any('"sleeping"' in line and needle in line for line in text.splitlines()):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"call {account_id} not in the handler within {timeout} s")
        await asyncio.sleep(0.02)


async def _calls_recorded(dsn: str) -> list[str]:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return [r["account_id"] for r in await conn.fetch("SELECT account_id FROM sleepy_calls")]
    finally:
        await conn.close()


# -- graceful shutdown ----------------------------------------------------------------------------


async def test_sigterm_drains_in_flight_calls_and_refuses_new_ones(
    sleepy: ServiceProcess, sleepy_dsn: str
) -> None:
    assert sleepy.process is not None
    async with grpc.aio.insecure_channel(sleepy.endpoint) as channel:
        stub = payments_pb2_grpc.PaymentsStub(channel)
        started = time.monotonic()
        in_flight = asyncio.ensure_future(
            stub.GetAccount(payments_pb2.GetAccountRequest(account_id="2"), timeout=15)
        )
        await wait_in_handler(sleepy, "2")
        assert not in_flight.done()

        sleepy.process.send_signal(signal.SIGTERM)
        terminated = time.monotonic()

        # Draining: readiness says so at once (Kubernetes stops routing here)...
        status, body = 0, ""
        for _ in range(20):
            status, body = await asyncio.to_thread(http_get, f"{sleepy.http}/readyz")
            if status == 503:
                break
            await asyncio.sleep(0.05)
        assert status == 503
        assert json.loads(body)["phase"] == "draining"

        # ...and a new call is refused, on the open channel and on a fresh one.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.GetAccount(payments_pb2.GetAccountRequest(account_id="0"), timeout=3)
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        # The health service says NOT_SERVING, or (listener already closed) nothing at all.
        async with grpc.aio.insecure_channel(sleepy.endpoint) as fresh:
            outcome: object
            try:
                response = await health_pb2_grpc.HealthStub(fresh).Check(
                    health_pb2.HealthCheckRequest(service="dtx.v1.Payments"), timeout=3
                )
                outcome = response.status
            except grpc.aio.AioRpcError as exc:
                outcome = exc.code()
            assert outcome in (
                health_pb2.HealthCheckResponse.NOT_SERVING,
                grpc.StatusCode.UNAVAILABLE,
            )

        # The call that was running when SIGTERM came completes normally.
        account = await asyncio.wait_for(in_flight, 10)
        assert account.id == "2"
        assert account.owner == "sleepy"
        assert time.monotonic() - started >= 2.0

    code = await asyncio.to_thread(sleepy.process.wait, GRACE_SECONDS + 10)
    exited_after = time.monotonic() - terminated
    assert code == 0, sleepy.tail()
    assert exited_after < GRACE_SECONDS + 3, f"exit took {exited_after:.1f} s"
    log = sleepy.log_path.read_text()
    assert '"draining"' in log
    assert '"stopped"' in log
    assert "Traceback" not in log
    # The drained call could still use the database: the pool closes after the drain.
    # The refused one never ran.
    assert await _calls_recorded(sleepy_dsn) == ["2"]


async def test_calls_longer_than_the_grace_are_cut_and_the_process_still_exits(
    sleepy_dsn: str, run_dir: Path
) -> None:
    proc = sleepy_process(sleepy_dsn, run_dir, DTX_SHUTDOWN_GRACE_SECONDS="1")
    proc.start(timeout=60)
    try:
        assert proc.process is not None
        async with grpc.aio.insecure_channel(proc.endpoint) as channel:
            stub = payments_pb2_grpc.PaymentsStub(channel)
            in_flight = asyncio.ensure_future(
                stub.GetAccount(payments_pb2.GetAccountRequest(account_id="20"), timeout=30)
            )
            await wait_in_handler(proc, "20")
            proc.process.send_signal(signal.SIGTERM)
            terminated = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError):
                await asyncio.wait_for(in_flight, 15)
        code = await asyncio.to_thread(proc.process.wait, 15)
        assert code == 0, proc.tail()
        assert time.monotonic() - terminated < 1 + 5
    finally:
        proc.kill()


# -- what probes and operators see ----------------------------------------------------------------


def _health(endpoint: str, service: str) -> int:
    with grpc.insecure_channel(endpoint) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
        return int(response.status)


def test_grpc_health_is_serving_once_up_and_reflection_lists_the_service(
    sleepy: ServiceProcess,
) -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    deadline = time.monotonic() + 5  # the health mirror polls readiness
    while True:
        statuses: dict[str, object] = {}
        for name in ("", "dtx.v1.Payments"):
            try:
                statuses[name] = _health(sleepy.endpoint, name)
            except grpc.RpcError as exc:
                statuses[name] = exc.code()
        if all(s == serving for s in statuses.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert statuses == {"": serving, "dtx.v1.Payments": serving}

    with pytest.raises(grpc.RpcError) as unknown:
        _health(sleepy.endpoint, "dtx.v1.NoSuchService")
    assert unknown.value.code() is grpc.StatusCode.NOT_FOUND

    with grpc.insecure_channel(sleepy.endpoint) as channel:
        reflection = ProtoReflectionDescriptorDatabase(channel)
        services = set(reflection.get_services())
        assert {
            "dtx.v1.Payments",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        } <= services
        # and it serves the descriptors, so grpcurl can call the service without protos
        file = reflection.FindFileContainingSymbol("dtx.v1.Payments")
        assert file.name == "dtx/v1/payments.proto"
        assert [m.name for m in file.service[0].method] == ["CreateAccount", "GetAccount"]


def _handled(metrics_text: str) -> dict[tuple[str, str, str], float]:
    counts = {}
    for family in text_string_to_metric_families(metrics_text):
        if family.name == "dtx_grpc_server_handled":
            for sample in family.samples:
                if sample.name == "dtx_grpc_server_handled_total":
                    labels = sample.labels
                    key = (labels["grpc_service"], labels["grpc_method"], labels["grpc_code"])
                    counts[key] = sample.value
    return counts


def test_metrics_count_calls_by_code_and_healthz_answers(sleepy: ServiceProcess) -> None:
    status, body = http_get(f"{sleepy.http}/healthz")
    assert status == 200
    assert json.loads(body) == {"alive": True, "phase": "serving"}

    status, body = http_get(f"{sleepy.http}/readyz")
    assert status == 200
    assert json.loads(body) == {"ready": True, "phase": "serving", "failures": {}}

    with grpc.insecure_channel(sleepy.endpoint) as channel:
        stub = payments_pb2_grpc.PaymentsStub(channel)
        for _ in range(2):
            assert (
                stub.GetAccount(payments_pb2.GetAccountRequest(account_id="0"), timeout=5).id == "0"
            )
        with pytest.raises(grpc.RpcError) as bad:
            stub.GetAccount(payments_pb2.GetAccountRequest(account_id="soon"), timeout=5)
        assert bad.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "account_id" in (bad.value.details() or "")
        counted = stub.CreateAccount(
            payments_pb2.CreateAccountRequest(owner="o", currency="EUR"), timeout=5
        )
        assert counted.balance_minor == 2  # both good calls reached the database

    status, text = http_get(f"{sleepy.http}/metrics")
    assert status == 200
    assert "dtx_grpc_server_handled_total" in text
    handled = _handled(text)
    assert handled[("dtx.v1.Payments", "GetAccount", "OK")] == 2
    assert handled[("dtx.v1.Payments", "GetAccount", "INVALID_ARGUMENT")] == 1
    assert handled[("dtx.v1.Payments", "CreateAccount", "OK")] == 1
    durations = {
        (s.labels["grpc_method"]): s.value
        for f in text_string_to_metric_families(text)
        if f.name == "dtx_grpc_server_handling_seconds"
        for s in f.samples
        if s.name == "dtx_grpc_server_handling_seconds_count"
        and s.labels["grpc_service"] == "dtx.v1.Payments"
    }
    assert durations == {"GetAccount": 3, "CreateAccount": 1}


# -- refusing to start ----------------------------------------------------------------------------


def test_a_bad_setting_exits_at_once_with_one_line_naming_it() -> None:
    started = time.monotonic()
    result = run_once({"DTX_GRPC_PORT": "abc", "DTX_HTTP_PORT": "9999"}, timeout=30)
    elapsed = time.monotonic() - started

    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "DTX_GRPC_PORT" in lines[0]
    assert "abc" in lines[0]
    assert "Traceback" not in result.stderr
    assert elapsed < 15


def _listening_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


@pytest.mark.parametrize("which", ["DTX_GRPC_PORT", "DTX_HTTP_PORT"])
def test_a_taken_port_exits_non_zero_naming_the_port(which: str, sleepy_dsn: str) -> None:
    other = "DTX_HTTP_PORT" if which == "DTX_GRPC_PORT" else "DTX_GRPC_PORT"
    with _listening_socket() as taken, socket.socket() as spare:
        spare.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        free = spare.getsockname()[1]
        spare.close()
        started = time.monotonic()
        result = run_once(
            {"DTX_DATABASE_URL": sleepy_dsn, which: str(port), other: str(free)}, timeout=60
        )
        elapsed = time.monotonic() - started

    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert str(port) in last, result.stderr
    assert last.startswith("dtx sleepy: cannot listen on")
    assert elapsed < 30

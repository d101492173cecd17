"""Readiness follows the database: 503 while PostgreSQL is down, 200 again once it is back.

The outage is real — the server is stopped — so the test brings a PostgreSQL of its own:
stopping the session's shared one would fail whatever else runs at the same time.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dtx.v1 import payments_pb2, payments_pb2_grpc
from dtx_infra.postgres import PostgresServer
from tests.support.private_servers import private_postgres
from tests.support.processes import ServiceProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[2]
RUN_SERVICE = ROOT / "tests" / "support" / "run_service.py"
PHASE_TIMEOUT_S = 15.0


def _readyz(proc: ServiceProcess) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(f"{proc.http}/readyz", timeout=5) as response:
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _grpc_health(proc: ServiceProcess) -> int:
    with grpc.insecure_channel(proc.endpoint) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="dtx.v1.Payments"), timeout=5
        )
        return int(response.status)


def _get_account(proc: ServiceProcess) -> payments_pb2.Account:
    with grpc.insecure_channel(proc.endpoint) as channel:
        stub = payments_pb2_grpc.PaymentsStub(channel)
        return stub.GetAccount(payments_pb2.GetAccountRequest(account_id="0"), timeout=10)


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = PHASE_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} within {timeout:g} s")
        time.sleep(0.2)


@pytest.fixture
def postgres() -> Iterator[PostgresServer]:
    with private_postgres() as server:
        server.create_database("sleepy")
        yield server


def test_readyz_follows_postgres_down_and_up(postgres: PostgresServer, run_dir: Path) -> None:
    proc = ServiceProcess(
        "sleepy",
        {"DTX_DATABASE_URL": postgres.dsn("sleepy")},
        run_dir,
        argv=[sys.executable, str(RUN_SERVICE), "tests.support.sleepy_service"],
    )
    proc.start(timeout=60)
    try:
        assert _readyz(proc) == (200, {"ready": True, "phase": "serving", "failures": {}})
        assert _get_account(proc).id == "0"

        try:
            postgres.stop()

            _wait_for(lambda: _readyz(proc)[0] == 503, "503 with PostgreSQL stopped")
            body = _readyz(proc)[1]
            assert body["phase"] == "serving"  # still serving: only a dependency is missing
            assert "database" in body["failures"]  # type: ignore[operator]
            # The gRPC health service mirrors readiness (what the Kubernetes probe asks).
            _wait_for(
                lambda: _grpc_health(proc) == health_pb2.HealthCheckResponse.NOT_SERVING,
                "gRPC NOT_SERVING with PostgreSQL stopped",
            )
            # A call that needs the database is UNAVAILABLE (retryable), not UNKNOWN.
            with pytest.raises(grpc.RpcError) as failed:
                _get_account(proc)
            assert failed.value.code() is grpc.StatusCode.UNAVAILABLE
            # Liveness stays fine: a database outage must not restart the pods.
            with urllib.request.urlopen(f"{proc.http}/healthz", timeout=5) as response:
                assert response.status == 200
            assert proc.process is not None
            assert proc.process.poll() is None
        finally:
            postgres.start()

        _wait_for(lambda: _readyz(proc)[0] == 200, "200 again with PostgreSQL back")
        assert _readyz(proc) == (200, {"ready": True, "phase": "serving", "failures": {}})
        _wait_for(
            lambda: _grpc_health(proc) == health_pb2.HealthCheckResponse.SERVING,
            "gRPC SERVING again with PostgreSQL back",
        )
        assert _get_account(proc).id == "0"
    finally:
        proc.kill()

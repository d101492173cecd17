"""A smoke test of what ``make run`` does: ``dtx up --demo`` from nothing to a serving gateway and back."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support.processes import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def test_dtx_up_with_the_demo_serves_the_gateway_then_stops_cleanly() -> None:
    # Its own state dir (PostgreSQL, running as the postgres user, must be able to enter it).
    state = Path(tempfile.mkdtemp(prefix="dtx-up-", dir="/tmp"))
    state.chmod(0o755)
    port = free_port()
    env = {
        **os.environ,
        "DTX_STATE_DIR": str(state),
        "DTX_PG_PORT": str(free_port()),
        "DTX_KAFKA_PORT": str(free_port()),
        "DTX_KAFKA_CONTROLLER_PORT": str(free_port()),
        "COLUMNS": "200",
    }
    log = state / "up.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dtx_cli", "up", "--demo", "--gateway-port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    services: list[int] = []
    try:
        deadline = time.monotonic() + 300
        while "gateway serving at" not in log.read_text(errors="replace"):
            assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.5)
        services = _children(proc.pid)
        text = log.read_text(errors="replace")
        assert "demo finished: 40 orders placed, 0 errors" in text
        assert "confirmed" in text.lower()
        assert "rejected" in text.lower() or "cancelled" in text.lower()  # failures on purpose
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/docs", timeout=10) as response:
            assert response.status == 200
        # The command line against the running gateway: a token, then the transactions.
        dtx = [sys.executable, "-m", "dtx_cli"]
        gateway = ["--gateway", f"http://127.0.0.1:{port}"]
        token = subprocess.run(
            [*dtx, "token", "--role", "admin"], env=env, capture_output=True, text=True, timeout=60
        )
        assert token.returncode == 0, token.stderr
        assert token.stdout.count(".") == 2  # a JWT
        listed = subprocess.run(
            [*dtx, "txn", "list", *gateway], env=env, capture_output=True, text=True, timeout=60
        )
        assert listed.returncode == 0, listed.stderr
        assert "2pc" in listed.stdout.lower() or "two" in listed.stdout.lower(), listed.stdout
        refused = subprocess.run(
            [*dtx, "txn", "retry", "no-such-gid", "--reason", "smoke", *gateway],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert refused.returncode != 0
        assert "404" in refused.stderr + refused.stdout

        assert len(services) >= 7
        proc.send_signal(signal.SIGINT)
        assert proc.wait(90) == 0, log.read_text(errors="replace")[-3000:]
        time.sleep(1)
        assert [p for p in services if _alive(p)] == []
        assert "stopped" in log.read_text(errors="replace")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # dtx up stops its services itself
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        # Services run in sessions of their own: a parent killed hard leaves them.
        for pid in services:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if proc.returncode != 0:
            subprocess.run(
                [sys.executable, "-m", "dtx_cli", "infra", "down"], env=env, timeout=60, check=False
            )
        shutil.rmtree(state, ignore_errors=True)

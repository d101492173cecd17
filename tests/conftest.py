"""Shared fixtures: the real local PostgreSQL and Kafka, fresh databases, service processes.

The servers are started once per test session by :mod:`dtx_infra` in a state
directory of their own (``.dtx/test``) on ports of their own, so a developer's
``dtx infra up`` and the tests never step on each other.

Under pytest-xdist (``make test`` runs several workers) every worker shares
those two servers: the first worker to need them starts them (``dtx_infra``
holds a file lock, so the others wait and find them running), and the
controller stops them when the whole run is over — a worker that finishes
early must not take them from the others. Tests therefore never stop the
shared servers; one that needs an outage brings its own
(:mod:`tests.support.private_servers`). Each worker picks free ports from a
range of its own (``DTX_PORT_RANGE``), so two workers never hand out the same
port to services that have not bound it yet.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dtx_infra import LocalInfra
from dtx_infra.ports import pickable_ports

ROOT = Path(__file__).resolve().parent.parent
TEST_STATE = Path(os.environ.get("DTX_TEST_STATE_DIR", ROOT / ".dtx" / "test"))
# Written when this run started the servers; whoever finishes the run stops them.
STARTED_BY_TESTS = TEST_STATE / ".started-by-tests"


def _test_infra() -> LocalInfra:
    os.environ.setdefault("DTX_PG_PORT", "55433")
    os.environ.setdefault("DTX_KAFKA_PORT", "59192")
    os.environ.setdefault("DTX_KAFKA_CONTROLLER_PORT", "59193")
    return LocalInfra(state_dir=TEST_STATE)


def pytest_configure(config: pytest.Config) -> None:
    worker = os.environ.get("PYTEST_XDIST_WORKER")  # gw0, gw1, ... in xdist's workers
    if worker:
        index, count = int(worker.removeprefix("gw")), int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
        ports = pickable_ports()
        span = len(ports) // count
        low = ports.start + index * span
        os.environ["DTX_PORT_RANGE"] = f"{low}-{low + span - 1}"


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Stop the servers this run started, once: in the controller, or the only process."""
    if os.environ.get("PYTEST_XDIST_WORKER") or os.environ.get("DTX_TEST_KEEP_INFRA"):
        return
    if STARTED_BY_TESTS.exists():
        _test_infra().down()
        STARTED_BY_TESTS.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def infra() -> LocalInfra:
    """The local infrastructure, up for the whole run (see the module docstring)."""
    local = _test_infra()
    # Servers already up belong to another session (or a developer): leave them up.
    started_here = not local.status().all_running
    local.up(timeout_s=180)
    if started_here:
        STARTED_BY_TESTS.touch()
    return local


@pytest.fixture
def new_database(infra: LocalInfra) -> Iterator[Callable[[str], str]]:
    """Create fresh databases for one test; returns a factory name -> DSN; drops them after."""
    created: list[str] = []
    postgres = infra.postgres

    def make(prefix: str = "t") -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        postgres.create_database(name)
        created.append(name)
        dsn: str = postgres.dsn(name)
        return dsn

    yield make
    for name in created:
        postgres.drop_database(name)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """Where a test's service logs go (kept by pytest for the failed ones)."""
    path = tmp_path / "logs"
    path.mkdir()
    return path

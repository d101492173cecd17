"""Shared fixtures: the real local PostgreSQL and Kafka, fresh databases, service processes.

The servers are started once per test session by :mod:`dtx_infra` in a state
directory of their own (``.dtx/test``) on ports of their own, so a developer's
``dtx infra up`` and the tests never step on each other.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TEST_STATE = Path(os.environ.get("DTX_TEST_STATE_DIR", ROOT / ".dtx" / "test"))


@pytest.fixture(scope="session")
def infra() -> Iterator[object]:
    """The local infrastructure, up for the whole session and down at its end."""
    from dtx_infra import LocalInfra

    os.environ.setdefault("DTX_PG_PORT", "55433")
    os.environ.setdefault("DTX_KAFKA_PORT", "59192")
    os.environ.setdefault("DTX_KAFKA_CONTROLLER_PORT", "59193")
    local = LocalInfra(state_dir=TEST_STATE)
    # Servers already up belong to another session (or a developer): leave them up.
    started_here = not local.status().all_running
    local.up(timeout_s=180)
    try:
        yield local
    finally:
        if started_here and not os.environ.get("DTX_TEST_KEEP_INFRA"):
            local.down()


@pytest.fixture
def new_database(infra: object) -> Iterator[Callable[[str], str]]:
    """Create fresh databases for one test; returns a factory name -> DSN; drops them after."""
    created: list[str] = []
    postgres = infra.postgres  # type: ignore[attr-defined]

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

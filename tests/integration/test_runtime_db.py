"""Migrations against the real PostgreSQL: idempotent, checksummed, atomic, one applier at a time."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import pytest

from dtx_runtime import MigrationError, StartupError
from dtx_runtime.database import create_pool, migrate
from dtx_runtime.migrations import advisory_lock_key
from dtx_runtime.participant import BARRIER_MIGRATIONS

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

ACCOUNTS = """
CREATE TABLE accounts (
    id      bigserial PRIMARY KEY,
    owner   text NOT NULL
);
INSERT INTO accounts (owner) VALUES ('seed');
"""
BALANCE = "ALTER TABLE accounts ADD COLUMN balance_minor bigint NOT NULL DEFAULT 0;"


@pytest.fixture
def dsn(new_database: Callable[[str], str]) -> str:
    return new_database("rtdb")


@pytest.fixture
async def pool(dsn: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(dsn, min_size=1, max_size=4, connect_timeout_s=20)
    try:
        yield pool
    finally:
        await pool.close()


def _migrations(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, sql in files.items():
        (directory / name).write_text(sql)
    return directory


async def _ledger(pool: asyncpg.Pool) -> list[dict[str, object]]:
    rows = await pool.fetch(
        "SELECT component, version, name, checksum, applied_at FROM dtx_schema_migrations"
        " ORDER BY component, version"
    )
    return [dict(r) for r in rows]


async def _table_exists(pool: asyncpg.Pool, name: str) -> bool:
    return bool(await pool.fetchval("SELECT to_regclass($1) IS NOT NULL", name))


async def test_applying_twice_applies_nothing_the_second_time(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    service = _migrations(
        tmp_path / "service", {"0001_accounts.sql": ACCOUNTS, "0002_balance.sql": BALANCE}
    )
    components = {"barrier": BARRIER_MIGRATIONS, "service": service}

    first = await migrate(pool, components, scope="payments")
    ledger = await _ledger(pool)
    second = await migrate(pool, components, scope="payments")

    assert first["barrier"], "the runtime's barrier migrations applied nothing"
    assert first["service"] == [1, 2]
    assert second == {"barrier": [], "service": []}
    assert await _ledger(pool) == ledger  # same rows, same applied_at: nothing rewritten
    # Each component has its own numbering in the one ledger.
    assert [r["version"] for r in ledger if r["component"] == "barrier"] == first["barrier"]
    assert [(r["version"], r["name"]) for r in ledger if r["component"] == "service"] == [
        (1, "accounts"),
        (2, "balance"),
    ]
    # The schema is there, and the seed row was inserted exactly once.
    assert await pool.fetchval("SELECT count(*) FROM accounts") == 1
    assert await pool.fetchval("SELECT balance_minor FROM accounts") == 0


async def test_a_new_migration_is_applied_on_the_next_start(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    service = _migrations(tmp_path / "service", {"0001_accounts.sql": ACCOUNTS})
    assert await migrate(pool, {"service": service}, scope="payments") == {"service": [1]}
    assert not await _table_exists(pool, "accounts_archive")

    _migrations(service, {"0002_archive.sql": "CREATE TABLE accounts_archive (id bigint);"})

    assert await migrate(pool, {"service": service}, scope="payments") == {"service": [2]}
    assert await _table_exists(pool, "accounts_archive")


async def test_a_changed_applied_migration_is_refused(pool: asyncpg.Pool, tmp_path: Path) -> None:
    service = _migrations(tmp_path / "service", {"0001_accounts.sql": ACCOUNTS})
    await migrate(pool, {"service": service}, scope="payments")
    ledger = await _ledger(pool)

    _migrations(
        service,
        {
            "0001_accounts.sql": ACCOUNTS.replace("owner   text", "owner   varchar(80)"),
            "0002_later.sql": "CREATE TABLE later (id int);",
        },
    )

    with pytest.raises(MigrationError) as caught:
        await migrate(pool, {"service": service}, scope="payments")

    assert "0001_accounts.sql" in str(caught.value)
    assert "changed after it was applied" in str(caught.value)
    assert await _ledger(pool) == ledger
    assert not await _table_exists(pool, "later"), "kept applying after the mismatch"


async def test_migrations_in_the_database_but_not_on_disk_are_refused(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    newer = _migrations(
        tmp_path / "newer", {"0001_accounts.sql": ACCOUNTS, "0002_balance.sql": BALANCE}
    )
    older = _migrations(tmp_path / "older", {"0001_accounts.sql": ACCOUNTS})
    await migrate(pool, {"service": newer}, scope="payments")

    with pytest.raises(MigrationError, match=r"\[2\]"):
        await migrate(pool, {"service": older}, scope="payments")


async def test_a_failing_migration_leaves_nothing_behind_and_releases_the_lock(
    pool: asyncpg.Pool, dsn: str, tmp_path: Path
) -> None:
    service = _migrations(
        tmp_path / "service",
        {
            "0001_accounts.sql": ACCOUNTS,
            "0002_broken.sql": "CREATE TABLE half (id int);\nALTER TABLE nowhere ADD COLUMN x int;",
        },
    )

    with pytest.raises(asyncpg.UndefinedTableError):
        await migrate(pool, {"service": service}, scope="payments")

    assert [r["version"] for r in await _ledger(pool)] == [1]
    assert not await _table_exists(pool, "half"), "the failed migration was not rolled back"
    # The advisory lock went with the failure: another session can take it at once.
    other = await asyncpg.connect(dsn)
    try:
        assert await other.fetchval(
            "SELECT pg_try_advisory_lock($1)", advisory_lock_key("payments")
        )
    finally:
        await other.close()

    (service / "0002_broken.sql").write_text("CREATE TABLE half (id int);")
    assert await migrate(pool, {"service": service}, scope="payments") == {"service": [2]}


async def test_create_pool_gives_up_in_bounded_time() -> None:
    with socket_bound() as port:  # a port nobody answers PostgreSQL on
        started = time.monotonic()
        with pytest.raises(StartupError) as caught:
            await create_pool(
                f"postgresql://dtx:secret@127.0.0.1:{port}/x",
                min_size=1,
                max_size=1,
                connect_timeout_s=1.0,
            )
        elapsed = time.monotonic() - started
    assert elapsed < 15
    assert f"127.0.0.1:{port}/x" in str(caught.value)
    assert "secret" not in str(caught.value)


class socket_bound:
    """A loopback port that is bound but not listening: connections are refused."""

    def __enter__(self) -> int:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        port: int = self._sock.getsockname()[1]
        return port

    def __exit__(self, *_: object) -> None:
        self._sock.close()


# -- two replicas starting at once ---------------------------------------------------------------

RACER = textwrap.dedent(
    """
    import asyncio, json, sys, time
    from pathlib import Path
    from dtx_runtime.database import create_pool, migrate

    dsn, directory, me, other = sys.argv[1:5]

    async def main() -> None:
        pool = await create_pool(dsn, min_size=1, max_size=2, connect_timeout_s=30)
        try:
            # A file barrier: neither starts migrating before both are connected.
            Path(me).touch()
            deadline = time.monotonic() + 60
            while not Path(other).exists():
                if time.monotonic() > deadline:
                    raise SystemExit("the other process never came")
                await asyncio.sleep(0.005)
            started = time.time()
            applied = await migrate(pool, {"service": Path(directory)}, scope="race")
            print(json.dumps({"applied": applied["service"], "started": started,
                              "finished": time.time()}))
        finally:
            await pool.close()

    asyncio.run(main())
    """
)


def test_two_processes_migrating_at_once_apply_each_migration_once(
    dsn: str, tmp_path: Path
) -> None:
    service = _migrations(
        tmp_path / "service",
        {
            # Not idempotent on purpose: run twice, the INSERT would leave two rows, and the
            # ledger insert of the second run would violate its primary key.
            "0001_slow.sql": (
                "CREATE TABLE IF NOT EXISTS race_target (id serial PRIMARY KEY, note text);\n"
                "INSERT INTO race_target (note) VALUES ('applied');\n"
                "SELECT pg_sleep(1);\n"
            ),
            "0002_more.sql": "INSERT INTO race_target (note) VALUES ('second');",
        },
    )
    marks = [tmp_path / "a.ready", tmp_path / "b.ready"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "services"), str(ROOT)])}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, dsn, str(service), str(me), str(other)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for me, other in (marks, marks[::-1])
    ]
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=90)
            assert proc.returncode == 0, f"migrating process failed:\n{err}"
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)

    applied = sorted((r["applied"] for r in results), key=len)
    assert applied == [[], [1, 2]], "exactly one process applies, the other finds nothing"
    # They really overlapped: the idle one started before the applier was done, and only
    # finished after it (it waited on the advisory lock, ~1 s of pg_sleep).
    applier = next(r for r in results if r["applied"])
    waiter = next(r for r in results if not r["applied"])
    assert waiter["started"] < applier["finished"] - 0.3
    assert waiter["finished"] >= applier["finished"] - 0.05

    async def check() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            tables = await conn.fetchval(
                "SELECT count(*) FROM pg_class WHERE relname = 'race_target' AND relkind = 'r'"
            )
            assert tables == 1
            notes = await conn.fetch("SELECT note FROM race_target ORDER BY id")
            assert [r["note"] for r in notes] == ["applied", "second"]
            ledger = await conn.fetch(
                "SELECT version, count(*) AS n FROM dtx_schema_migrations"
                " WHERE component = 'service' GROUP BY version ORDER BY version"
            )
            assert [(r["version"], r["n"]) for r in ledger] == [(1, 1), (2, 1)]
        finally:
            await conn.close()

    asyncio.run(check())

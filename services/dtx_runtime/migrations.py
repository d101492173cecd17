"""Versioned SQL migrations, applied at start-up under an advisory lock.

Files are named ``NNNN_description.sql`` and applied in version order, each in
its own transaction, and recorded with a checksum in ``dtx_schema_migrations``.
A database holds several components, each with its own numbering: the
service's own tables and the shared mechanics it uses (the participant
barrier, the outbox), which live once in the runtime rather than copied into
every service.
Two replicas that start at once serialise on a PostgreSQL advisory lock keyed
by the service, so one applies and the other finds nothing left to do.
A migration edited after it was applied is refused rather than silently
skipped: the schema would no longer match the files.

A library such as Alembic would bring SQLAlchemy and a second, synchronous
driver for what is here a few dozen lines over asyncpg.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from dtx_runtime.errors import MigrationError

_NAME = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+)\.sql\Z")

_LEDGER = """
CREATE TABLE IF NOT EXISTS dtx_schema_migrations (
    component  text NOT NULL,
    version    integer NOT NULL,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (component, version)
)
"""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def discover(directory: Path) -> list[Migration]:
    """Read the migrations of a directory in version order.

    Unknown file names and duplicate versions are errors, not silently
    ignored: a typo would otherwise leave a table out of the schema.
    """
    if not directory.is_dir():
        raise MigrationError(f"migrations directory {directory} does not exist")
    found: dict[int, Migration] = {}
    for path in sorted(directory.iterdir()):
        if path.suffix != ".sql":
            continue
        match = _NAME.match(path.name)
        if match is None:
            raise MigrationError(
                f"migration file {path.name} is not named NNNN_lowercase_words.sql"
            )
        version = int(match["version"])
        if version in found:
            raise MigrationError(f"two migrations share version {version:04d} in {directory}")
        found[version] = Migration(version, match["name"], path.read_text())
    return [found[v] for v in sorted(found)]


def advisory_lock_key(scope: str) -> int:
    """A stable signed 64-bit key, so every replica of a service picks the same lock."""
    digest = hashlib.blake2b(f"dtx-migrations:{scope}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


async def apply_migrations(
    conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy,
    migrations: list[Migration],
    *,
    scope: str,
    component: str = "service",
    lock_timeout_s: float = 60.0,
) -> list[int]:
    """Apply what is not yet applied; return the versions applied by this call.

    ``scope`` names the lock (the service), ``component`` the numbering.
    """
    key = advisory_lock_key(scope)
    await conn.execute(f"SET lock_timeout = '{int(lock_timeout_s * 1000)}ms'")
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", key)
    except asyncpg.LockNotAvailableError:
        raise MigrationError(
            f"another process held the migration lock of {scope} for over {lock_timeout_s:g} s"
        ) from None
    try:
        await conn.execute(_LEDGER)
        rows = await conn.fetch(
            "SELECT version, name, checksum FROM dtx_schema_migrations WHERE component = $1",
            component,
        )
        applied = {r["version"]: r for r in rows}
        known = {m.version for m in migrations}
        unknown = sorted(set(applied) - known)
        if unknown:
            raise MigrationError(
                f"the database of {scope} has {component} migrations {unknown} that are not on disk"
                " (is an older build running against a newer schema?)"
            )
        done: list[int] = []
        for migration in migrations:
            row = applied.get(migration.version)
            if row is not None:
                if row["checksum"] != migration.checksum:
                    raise MigrationError(
                        f"{component} migration {migration.version:04d}_{migration.name}.sql of {scope}"
                        " changed after it was applied; add a new migration instead"
                    )
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO dtx_schema_migrations (component, version, name, checksum)"
                    " VALUES ($1, $2, $3, $4)",
                    component,
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
            done.append(migration.version)
        return done
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", key)
        await conn.execute("RESET lock_timeout")

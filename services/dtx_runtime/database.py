"""The asyncpg pool: created with a bounded wait for the database, migrated once."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from pathlib import Path

import asyncpg

from dtx_runtime.errors import StartupError
from dtx_runtime.migrations import apply_migrations, discover

log = logging.getLogger(__name__)


def _where(dsn: str) -> str:
    """The DSN without its password, for error messages."""
    return dsn.split("@")[-1] if "@" in dsn else dsn


async def keep_session(conn: asyncpg.Connection) -> None:
    """The pool's reset on release: nothing beyond asyncpg's own rollback of an open transaction.

    asyncpg's default sends ``RESET ALL; UNLISTEN *; CLOSE ALL; SELECT
    pg_advisory_unlock_all()`` on every release: one more round trip per
    acquire, on every hot path. dtx leaves no session state on pooled
    connections (settings are ``SET LOCAL``; the relay's lock and LISTEN use
    a connection of their own), so there is nothing to reset.
    """


async def create_pool(
    dsn: str,
    *,
    min_size: int,
    max_size: int,
    connect_timeout_s: float,
    server_settings: dict[str, str] | None = None,
) -> asyncpg.Pool:
    """Open the pool, retrying while the database is still starting, for a bounded time."""
    deadline = time.monotonic() + connect_timeout_s
    delay = 0.2
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            pool = await asyncpg.create_pool(
                dsn,
                min_size=min_size,
                max_size=max_size,
                timeout=min(10.0, connect_timeout_s),
                command_timeout=60,
                reset=keep_session,
                server_settings=server_settings,
            )
            if pool is None:  # pragma: no cover - asyncpg's typing allows it
                raise StartupError("asyncpg returned no pool")
            return pool
        except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
            last = exc
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
    raise StartupError(
        f"database at {_where(dsn)} not reachable within {connect_timeout_s:g} s: {last}"
    )


async def migrate(
    pool: asyncpg.Pool, components: Mapping[str, Path], *, scope: str
) -> dict[str, list[int]]:
    """Apply each component's migrations in the given order; log what was applied."""
    applied: dict[str, list[int]] = {}
    async with pool.acquire() as conn:
        for component, directory in components.items():
            applied[component] = await apply_migrations(
                conn, discover(directory), scope=scope, component=component
            )
            if applied[component]:
                log.info("applied %s migrations %s", component, applied[component])
    return applied

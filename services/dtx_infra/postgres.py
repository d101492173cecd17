"""dtx's own PostgreSQL cluster, in ``<state>/postgres``, on 127.0.0.1 only.

A private cluster (rather than the distribution's ``main`` one) means the project controls
exactly the settings 2PC needs (``max_prepared_transactions``) and can be wiped by deleting a
directory. ``postmaster.pid`` in the data dir is the pidfile: PostgreSQL maintains it itself,
including the port, so nothing else has to be kept in sync with it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from dtx_infra.asyncrun import run_coroutine
from dtx_infra.errors import InfraError
from dtx_infra.pg_binaries import APT_TIMEOUT_S, PgBinaries, ensure_pg_binaries, find_pg_binaries
from dtx_infra.pg_config import (
    INCLUDE_FILE,
    PG_USER,
    SERVICE_DATABASES,
    PgParams,
    ensure_include,
    render_pg_conf,
)
from dtx_infra.pg_user import RunAs, check_reachable, chown_tree, current_runas
from dtx_infra.ports import ensure_port_free, wait_port_free
from dtx_infra.procs import (
    cmdline,
    find_pids,
    pid_alive,
    proc_cwd,
    rotate_log,
    run,
    signal_pids,
    tail_file,
    terminate,
    wait_gone,
)
from dtx_infra.settings import HOST

_DB_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}\Z")
_Action = Callable[["asyncpg.Connection[asyncpg.Record]"], Awaitable[object]]


@dataclass(frozen=True)
class RunningPostgres:
    pid: int
    port: int


def _clean_env() -> dict[str, str]:
    """Our environment minus PG* variables, which would silently redirect the tools."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


class PostgresServer:
    """One PostgreSQL cluster whose files all live in ``<state_dir>/postgres``."""

    def __init__(self, state_dir: Path, port: int) -> None:
        self.home = state_dir / "postgres"
        self.port = port
        self.host = HOST
        self.user = PG_USER
        self.data_dir = self.home / "data"
        self.socket_dir = self.home / "run"
        self.log_path = self.home / "server.log"
        self.pid_path = self.data_dir / "postmaster.pid"

    # -- inspection -------------------------------------------------------------------------

    def running(self) -> RunningPostgres | None:
        """The live postmaster of this data dir, if any (postmaster.pid + alive + ours)."""
        try:
            lines = self.pid_path.read_text().splitlines()
            pid, data_dir, port = int(lines[0]), Path(lines[1]), int(lines[3])
        except (OSError, ValueError, IndexError):
            return None
        if data_dir != self.data_dir or not pid_alive(pid):
            return None
        args = cmdline(pid)
        if not args or "postgres" not in Path(args[0]).name:
            return None  # a reused PID after a crash or reboot
        return RunningPostgres(pid, port)

    def is_running(self) -> bool:
        return self.running() is not None

    def pid(self) -> int | None:
        running = self.running()
        return running.pid if running else None

    def _current_port(self) -> int:
        running = self.running()
        return running.port if running else self.port

    def dsn(self, database: str) -> str:
        return f"postgresql://{self.user}@{self.host}:{self._current_port()}/{database}"

    # -- lifecycle --------------------------------------------------------------------------

    def start(self, timeout_s: float = 120, install_timeout_s: float = APT_TIMEOUT_S) -> None:
        """Start the cluster unless ours already runs; create the service databases.

        ``install_timeout_s`` bounds a one-time ``apt-get install postgresql`` separately
        from the readiness budget ``timeout_s``.
        """
        running = self.running()
        if running is not None:
            if running.port != self.port:
                raise InfraError(
                    f"PostgreSQL from {self.home} already runs on port {running.port} but "
                    f"port {self.port} was asked for; run `dtx infra down` first"
                )
            return
        deadline = time.monotonic() + timeout_s
        bins = ensure_pg_binaries(install_timeout_s)
        runas = current_runas()
        ensure_port_free(self.port, "DTX_PG_PORT")
        self._prepare_dirs(runas)
        self._initdb(bins, runas)
        self._write_conf(runas)
        self.pid_path.unlink(missing_ok=True)  # stale: running() said no live postmaster
        rotate_log(self.log_path)
        wait_s = max(1, int(deadline - time.monotonic()))
        try:
            run(
                [
                    *runas.prefix,
                    bins.tool("pg_ctl"),
                    "-D",
                    str(self.data_dir),
                    "-l",
                    str(self.log_path),
                    "-w",
                    "-t",
                    str(wait_s),
                    "-s",
                    "start",
                ],
                what="pg_ctl start",
                timeout_s=wait_s + 15,
                env=_clean_env(),
                cwd=self.home,
            )
            self._wait_accepting(deadline)
            self.ensure_databases(SERVICE_DATABASES)
        except InfraError as exc:
            self._stop_quietly()
            raise InfraError(
                f"PostgreSQL did not start on {HOST}:{self.port} (readiness budget "
                f"{timeout_s:.0f}s): {exc.summary}; see {self.log_path}",
                tail_file(self.log_path),
            ) from exc

    def _prepare_dirs(self, runas: RunAs) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        check_reachable(self.home, runas)
        self.socket_dir.mkdir(exist_ok=True)
        self.log_path.touch(exist_ok=True)
        if self.data_dir.exists() and not (self.data_dir / "PG_VERSION").exists():
            shutil.rmtree(self.data_dir)  # an interrupted initdb: start over
        chown_tree(self.home, runas)
        self.home.chmod(0o755)
        self.socket_dir.chmod(0o755)

    def _initdb(self, bins: PgBinaries, runas: RunAs) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            return
        run(
            [
                *runas.prefix,
                bins.tool("initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                self.user,
                "--auth=trust",  # local development only: the server listens on 127.0.0.1
                "-E",
                "UTF8",
                "--no-locale",
            ],
            what="initdb",
            timeout_s=180,
            env=_clean_env(),
            cwd=self.home,
        )
        ensure_include(self.data_dir / "postgresql.conf")

    def _write_conf(self, runas: RunAs) -> None:
        conf = self.data_dir / INCLUDE_FILE
        conf.write_text(render_pg_conf(PgParams(self.port, self.socket_dir)))
        if runas.switches_user:
            os.chown(conf, runas.uid, runas.gid)

    def _wait_accepting(self, deadline: float) -> None:
        """pg_ctl -w saw "ready" in postmaster.pid; also prove a TCP login works."""
        while True:
            try:
                self._query(lambda conn: conn.fetchval("SELECT 1"), "postgres", 5)
                return
            except (InfraError, OSError, asyncpg.PostgresError):
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.2)

    def stop(self, timeout_s: float = 30) -> None:
        """``pg_ctl stop -m fast``, escalating to signals; verify no process of ours is left."""
        running = self.running()
        if running is not None:
            bins = find_pg_binaries()
            try:
                if bins is None:
                    raise InfraError("server binaries are gone")
                run(
                    [
                        *current_runas().prefix,
                        bins.tool("pg_ctl"),
                        "-D",
                        str(self.data_dir),
                        "-m",
                        "fast",
                        "-w",
                        "-t",
                        str(max(1, int(timeout_s))),
                        "-s",
                        "stop",
                    ],
                    what="pg_ctl stop",
                    timeout_s=timeout_s + 15,
                    env=_clean_env(),
                    cwd=self.home,
                )
            except InfraError:
                # SIGQUIT is PostgreSQL's "immediate shutdown": no checkpoint, but crash-safe.
                signal_pids([running.pid], signal.SIGQUIT)
                wait_gone([running.pid], 10)
        leftovers = self._cluster_pids()
        if leftovers:
            terminate(leftovers, 5, "stopping PostgreSQL")
        if running is not None and not wait_port_free(running.port, 10):
            raise InfraError(f"PostgreSQL stopped but port {running.port} is still not free")

    def _cluster_pids(self) -> list[int]:
        """Every process of this cluster: PostgreSQL processes all chdir to the data dir."""
        data_dir = self.data_dir.resolve()

        def ours(pid: int) -> bool:
            args = cmdline(pid)
            return bool(args) and "postgres" in args[0] and proc_cwd(pid) == data_dir

        return find_pids(ours)

    def _stop_quietly(self) -> None:
        with contextlib.suppress(InfraError):
            self.stop(timeout_s=10)

    # -- databases --------------------------------------------------------------------------

    def _query(self, action: _Action, database: str, timeout_s: float = 30) -> object:
        running = self.running()
        if running is None:
            raise InfraError(f"PostgreSQL from {self.home} is not running; run `dtx infra up`")

        async def go() -> object:
            conn = await asyncpg.connect(
                host=self.host,
                port=running.port,
                user=self.user,
                database=database,
                timeout=timeout_s,
            )
            try:
                return await action(conn)
            finally:
                await conn.close()

        return run_coroutine(go, timeout_s, f"PostgreSQL query on {database}")

    def ensure_databases(self, names: tuple[str, ...] | list[str]) -> None:
        """Create each database in ``names`` that does not exist yet."""
        for name in names:
            _check_name(name)

        async def create_missing(conn: asyncpg.Connection) -> None:
            existing = {r["datname"] for r in await conn.fetch("SELECT datname FROM pg_database")}
            for name in names:
                if name not in existing:
                    await conn.execute(f'CREATE DATABASE "{name}"')

        self._query(create_missing, "postgres")

    def create_database(self, name: str) -> None:
        """Create ``name`` if missing (lowercase identifier; idempotent)."""
        self.ensure_databases([name])

    def drop_database(self, name: str) -> None:
        """Drop ``name`` if present, even with open sessions or prepared transactions.

        In a 2PC system a test that fails between PREPARE and COMMIT leaves prepared
        transactions behind, and those block DROP DATABASE; they are rolled back first.
        """
        _check_name(name)

        async def exists(conn: asyncpg.Connection) -> bool:
            return bool(await conn.fetchval("SELECT 1 FROM pg_database WHERE datname=$1", name))

        if not self._query(exists, "postgres"):
            return

        async def rollback_prepared(conn: asyncpg.Connection) -> None:
            gids = await conn.fetch(
                "SELECT gid FROM pg_prepared_xacts WHERE database = current_database()"
            )
            for row in gids:
                await conn.execute("ROLLBACK PREPARED " + _literal(row["gid"]))

        self._query(rollback_prepared, name)

        async def drop(conn: asyncpg.Connection) -> None:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

        self._query(drop, "postgres")


def _check_name(name: str) -> None:
    if not _DB_NAME.match(name):
        raise InfraError(f"invalid database name {name!r}: use a lowercase SQL identifier")


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"

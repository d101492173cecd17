"""The settings dtx's own PostgreSQL cluster runs with, rendered as a config include file.

initdb writes a stock ``postgresql.conf``; we append one ``include`` of ``dtx.conf`` and
re-render that file on every start, so a changed port or setting takes effect without
re-initialising the cluster, and the stock file stays as initdb left it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dtx_infra.settings import HOST

PG_USER = "dtx"
INCLUDE_FILE = "dtx.conf"
INCLUDE_LINE = f"include '{INCLUDE_FILE}'"
# sockaddr_un.sun_path holds 108 bytes; PostgreSQL appends "/.s.PGSQL.<port>" (+ ".lock").
_MAX_SOCKET_PATH = 107
SERVICE_DATABASES = ("payments", "inventory", "orders", "coordinator", "saga", "notifications")


@dataclass(frozen=True)
class PgParams:
    port: int
    socket_dir: Path
    host: str = HOST


def _quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "''") + "'"


def socket_dir_setting(socket_dir: Path, port: int) -> str:
    """The socket dir, or "" (no Unix socket) when its path would exceed the kernel limit.

    Clients here always use TCP on 127.0.0.1; the socket only exists because PostgreSQL
    otherwise insists on /var/run/postgresql, which may be missing or not ours.
    """
    socket_path = f"{socket_dir}/.s.PGSQL.{port}.lock"
    return str(socket_dir) if len(socket_path.encode()) <= _MAX_SOCKET_PATH else ""


def render_pg_conf(p: PgParams) -> str:
    settings: list[tuple[str, str]] = [
        ("listen_addresses", _quote(p.host)),  # loopback only: trust auth is local dev only
        ("port", str(p.port)),
        ("unix_socket_directories", _quote(socket_dir_setting(p.socket_dir, p.port))),
        ("max_connections", "300"),
        # PREPARE TRANSACTION is refused while this is 0 (the default): dtx's 2PC needs it.
        ("max_prepared_transactions", "256"),
        ("shared_buffers", "128MB"),
        # Durability stays on: a prepared transaction must survive a crash to be committed.
        ("fsync", "on"),
        ("synchronous_commit", "on"),
        ("full_page_writes", "on"),
        ("logging_collector", "off"),  # pg_ctl -l already sends stderr to server.log
        ("log_destination", _quote("stderr")),
        ("log_line_prefix", _quote("%m [%p] %q%u@%d ")),
        ("log_timezone", _quote("UTC")),
        ("timezone", _quote("UTC")),
    ]
    lines = ["# Rendered by dtx_infra.pg_config on every start; edits are overwritten."]
    lines += [f"{key} = {value}" for key, value in settings]
    return "\n".join(lines) + "\n"


def ensure_include(postgresql_conf: Path) -> None:
    """Append the include of dtx.conf to initdb's postgresql.conf, once."""
    text = postgresql_conf.read_text()
    if INCLUDE_LINE not in text.splitlines():
        postgresql_conf.write_text(text.rstrip("\n") + f"\n\n# dtx_infra\n{INCLUDE_LINE}\n")

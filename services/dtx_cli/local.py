"""``dtx up``: the whole system on this machine, supervised, with one log stream.

The local PostgreSQL and Kafka come up first (``dtx infra``), then every
service as a child process wired by :class:`~dtx_cli.system.LocalSystem`.
Their JSON logs are followed and printed one line each, prefixed by the
service. A service that dies is restarted, a bounded number of times. Ctrl-C
(or SIGTERM) stops every service gracefully, then the infrastructure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from rich.console import Console

from dtx_cli.system import LocalSystem
from dtx_infra import LocalInfra

ALL_SERVICES = (
    "coordinator",
    "saga",
    "payments",
    "inventory",
    "orders",
    "notifications",
    "gateway",
)
RESTARTS_PER_MINUTE = 5
COLORS = ("cyan", "magenta", "green", "yellow", "blue", "red", "bright_cyan")


def local_jwt_secret(state_dir: Path) -> str:
    """The gateway's signing secret for local use: made once, kept in the state dir (0600)."""
    path = state_dir / "jwt-secret"
    if not path.exists():
        state_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(48))
        path.chmod(0o600)
    return path.read_text().strip()


def render_line(service: str, line: str) -> str:
    """One JSON log record as ``level message key=value``; other lines as they are."""
    try:
        record = json.loads(line)
    except ValueError:
        return line
    if not isinstance(record, dict):
        return line
    skip = {"time", "level", "logger", "message", "service", "trace_id", "span_id"}
    extras = " ".join(
        f"{k}={v}" for k, v in record.items() if k not in skip and v not in ("", None)
    )
    trace = f" trace={record['trace_id'][:8]}" if record.get("trace_id") else ""
    return f"{record.get('level', ''):<7} {record.get('message', '')} {extras}{trace}".rstrip()


async def follow_logs(system: LocalSystem, console: Console, stop: asyncio.Event) -> None:
    """Print every service's new log lines, prefixed and coloured by service."""
    offsets: dict[str, int] = {}
    width = max(len(k) for k in system.procs)
    while not stop.is_set():
        for i, (key, proc) in enumerate(system.procs.items()):
            try:
                with proc.log_path.open("rb") as handle:
                    handle.seek(offsets.get(key, 0))
                    chunk = handle.read()
                    offsets[key] = handle.tell()
            except FileNotFoundError:
                continue
            color = COLORS[i % len(COLORS)]
            for raw in chunk.decode(errors="replace").splitlines():
                console.print(
                    f"[{color}]{key:<{width}}[/{color}] | {render_line(key, raw)}",
                    markup=True,
                    highlight=False,
                    soft_wrap=True,
                )
        await asyncio.sleep(0.2)


async def supervise(system: LocalSystem, console: Console, stop: asyncio.Event) -> None:
    """Restart a service that died, at most RESTARTS_PER_MINUTE times a minute."""
    restarts: dict[str, list[float]] = {}
    while not stop.is_set():
        for key, proc in system.procs.items():
            if proc.process is None or proc.process.poll() is None:
                continue
            now = time.monotonic()
            recent = [t for t in restarts.get(key, []) if now - t < 60]
            if len(recent) >= RESTARTS_PER_MINUTE:
                console.print(f"[red]{key} keeps dying; not restarting it again[/red]")
                proc.process = None
                continue
            console.print(
                f"[yellow]{key} exited with {proc.process.returncode}; restarting[/yellow]"
            )
            restarts[key] = [*recent, now]
            await asyncio.to_thread(proc.start, wait=False)
        await asyncio.sleep(1.0)


async def run_up(
    *,
    gateway_port: int,
    keep_infra: bool,
    after_start: Callable[[str, str], Awaitable[None]] | None = None,
) -> None:
    """Bring everything up and keep it running until SIGINT/SIGTERM."""
    console = Console()
    infra = LocalInfra()
    console.print("[bold]starting PostgreSQL and Kafka[/bold]")
    endpoints = await asyncio.to_thread(infra.up)
    secret = local_jwt_secret(infra.state_dir)
    system = LocalSystem(
        infra.state_dir / "logs",
        infra.postgres.dsn,
        services=ALL_SERVICES,
        kafka_bootstrap=endpoints.kafka_bootstrap,
        env={
            "DTX_GATEWAY_PORT": str(gateway_port),
            "DTX_JWT_SECRET": secret,
            "DTX_ALLOW_UNCOORDINATED": "true",
            **(
                {"OTEL_EXPORTER_OTLP_ENDPOINT": os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"]}
                if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                else {}
            ),
        },
    ).build()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    tasks: list[asyncio.Task[None]] = []
    try:
        console.print(f"[bold]starting {len(system.procs)} services[/bold]")
        tasks.append(asyncio.create_task(follow_logs(system, console, stop)))
        await asyncio.to_thread(system.start, 90)
        tasks.append(asyncio.create_task(supervise(system, console, stop)))
        url = f"http://127.0.0.1:{gateway_port}"
        console.print(
            "pids: " + ", ".join(f"{key} {proc.pid}" for key, proc in system.procs.items())
        )
        console.print(f"[bold green]dtx is up: gateway at {url} (docs: {url}/docs)[/bold green]")
        if after_start is not None:
            await after_start(url, secret)
        console.print(
            f"[bold green]gateway serving at {url} — Ctrl-C stops everything[/bold green]"
        )
        await stop.wait()
    finally:
        stop.set()
        console.print("[bold]stopping services[/bold]")
        await asyncio.to_thread(system.stop)
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if not keep_infra:
            console.print("[bold]stopping PostgreSQL and Kafka[/bold]")
            await asyncio.to_thread(infra.down)
        console.print("[bold]stopped[/bold]")

"""``dtx up``: the whole system on this machine, supervised, with one log stream.

The local PostgreSQL and Kafka come up first (``dtx infra``), then every
service as a child process wired by :class:`~dtx_cli.system.LocalSystem`.
Their JSON logs are followed and printed one line each, prefixed by the
service, as plain text: never read as rich markup. A service that dies is
restarted, a bounded number of times. Ctrl-C (or SIGTERM) stops every service
gracefully, then the infrastructure; so does any error, printing included.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console
from rich.text import Text

from dtx_cli.system import LocalSystem
from dtx_infra import Endpoints, LocalInfra

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

LinePrinter = Callable[[Console, str, str, str], None]
"""``(console, prefix, style, text)``: how one line of a service's output is printed."""


class Infra(Protocol):
    """What the supervisor needs of the infrastructure: a :class:`LocalInfra`, or a stand-in."""

    def up(self) -> Endpoints: ...

    def down(self) -> None: ...


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


def print_service_line(console: Console, prefix: str, style: str, text: str) -> None:
    """Print ``prefix | text``, only the prefix styled, ``text`` exactly as the service wrote it.

    A ``Text`` is never parsed for markup or emoji codes, and highlighting is off:
    brackets in a line (a gRPC method, a customer's input) once crashed the
    supervisor mid-run (issue 14). ``soft_wrap`` keeps a long line whole.
    """
    console.print(Text.assemble((prefix, style), " | ", text), highlight=False, soft_wrap=True)


def say(console: Console, message: str, style: str = "bold") -> None:
    """A status line of the supervisor's own; plain text too, as it may hold names and URLs."""
    console.print(Text(message, style=style), highlight=False)


def read_new_lines(path: Path, offset: int) -> tuple[list[str], int]:
    """The complete lines written to ``path`` since ``offset``, and the offset after them.

    A line still being written stays for the next read, so a JSON record is
    never split into two halves that do not parse.
    """
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            chunk = handle.read()
    except FileNotFoundError:
        return [], offset
    complete = chunk[: chunk.rfind(b"\n") + 1]
    return complete.decode(errors="replace").splitlines(), offset + len(complete)


async def pause(stop: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds``, or less if ``stop`` is set meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def follow_logs(
    system: LocalSystem,
    console: Console,
    done: asyncio.Event,
    print_line: LinePrinter = print_service_line,
) -> None:
    """Print every service's new log lines, prefixed and coloured by service, until ``done``.

    One last pass after ``done`` shows what the services wrote while stopping.
    """
    offsets: dict[str, int] = {}
    width = max((len(k) for k in system.procs), default=0)
    while True:
        last = done.is_set()
        for i, (key, proc) in enumerate(system.procs.items()):
            lines, offsets[key] = read_new_lines(proc.log_path, offsets.get(key, 0))
            for raw in lines:
                print_line(
                    console, f"{key:<{width}}", COLORS[i % len(COLORS)], render_line(key, raw)
                )
        if last:
            return
        await pause(done, 0.2)


async def supervise(system: LocalSystem, console: Console, stop: asyncio.Event) -> None:
    """Restart a service that died, at most RESTARTS_PER_MINUTE times a minute."""
    restarts: dict[str, list[float]] = {}
    while not stop.is_set():
        for key, proc in system.procs.items():
            if stop.is_set():  # never restart a service that is being stopped
                return
            if proc.process is None or proc.process.poll() is None:
                continue
            now = time.monotonic()
            recent = [t for t in restarts.get(key, []) if now - t < 60]
            if len(recent) >= RESTARTS_PER_MINUTE:
                say(console, f"{key} keeps dying; not restarting it again", "red")
                proc.process = None
                continue
            say(console, f"{key} exited with {proc.process.returncode}; restarting", "yellow")
            restarts[key] = [*recent, now]
            await asyncio.to_thread(proc.start, wait=False)
        await pause(stop, 1.0)


def in_background(work: Coroutine[Any, Any, None], stop: asyncio.Event) -> asyncio.Task[None]:
    """A task whose end sets ``stop``: a dead log follower or supervisor stops the run.

    Otherwise the system would run on unwatched, and the failure surface only at exit.
    """
    task = asyncio.create_task(work)
    task.add_done_callback(lambda _: stop.set())
    return task


async def finish(task: asyncio.Task[None], end: asyncio.Event) -> None:
    """Let a background task end (``end`` is what it waits for); raise what it failed with."""
    end.set()
    await task


async def unless_stopped(work: Awaitable[None], stop: asyncio.Event) -> bool:
    """Await ``work`` unless ``stop`` comes first, then cancel it: whether ``work`` completed.

    So that Ctrl-C, or a failure elsewhere, need not wait for a slow start or demo.
    """
    task = asyncio.ensure_future(work)
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        task.cancel()  # no effect once it is done
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if task.cancelled():
        return False
    task.result()  # raises what ``work`` failed with
    return True


async def start_services(system: LocalSystem, stop: asyncio.Event, timeout: float) -> bool:
    """Start every service: True once all are ready, False if ``stop`` came first.

    Spawning always completes, so ``system.stop`` finds every process; only the
    wait for readiness is cut short. A wait abandoned in its thread ends by
    itself once ``system.stop`` has ended the processes.
    """
    await asyncio.to_thread(system.spawn)
    return await unless_stopped(asyncio.to_thread(system.wait_ready, timeout), stop)


async def run_system(
    infra: Infra,
    make_system: Callable[[Endpoints], LocalSystem],
    console: Console,
    stop: asyncio.Event,
    *,
    keep_infra: bool = False,
    when_up: Callable[[LocalSystem], Awaitable[None]] | None = None,
    print_line: LinePrinter = print_service_line,
    ready_timeout: float = 90,
) -> None:
    """Start the infrastructure, then the services; run until ``stop``; stop both.

    Each stop step is registered before what it undoes starts, as a step of its
    own: whatever raises, a printer included, every later step still runs, so
    PostgreSQL and Kafka never outlive the command (issue 14). A failure is
    raised once everything is stopped.
    """
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(say, console, "stopped")
        if not keep_infra:
            stack.push_async_callback(asyncio.to_thread, infra.down)
            stack.callback(say, console, "stopping PostgreSQL and Kafka")
        say(console, "starting PostgreSQL and Kafka")
        endpoints = await asyncio.to_thread(infra.up)
        if stop.is_set():  # Ctrl-C while the servers were starting
            return
        system = make_system(endpoints)
        services_stopped = asyncio.Event()
        logs = in_background(follow_logs(system, console, services_stopped, print_line), stop)
        stack.push_async_callback(finish, logs, services_stopped)  # shows the services stopping
        stack.push_async_callback(asyncio.to_thread, system.stop)
        stack.callback(say, console, "stopping services")
        stack.callback(stop.set)
        say(console, f"starting {len(system.procs)} services")
        if not await start_services(system, stop, ready_timeout):
            return
        stack.push_async_callback(
            finish, in_background(supervise(system, console, stop), stop), stop
        )
        if when_up is not None:
            await unless_stopped(when_up(system), stop)
        await stop.wait()


async def run_up(
    *,
    gateway_port: int,
    keep_infra: bool,
    after_start: Callable[[str, str], Awaitable[None]] | None = None,
) -> None:
    """Bring everything up and keep it running until SIGINT/SIGTERM."""
    console = Console()
    infra = LocalInfra()
    url = f"http://127.0.0.1:{gateway_port}"
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Before anything starts: a Ctrl-C must reach the cleanup, not interrupt it.
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    def make_system(endpoints: Endpoints) -> LocalSystem:
        return LocalSystem(
            infra.state_dir / "logs",
            infra.postgres.dsn,
            services=ALL_SERVICES,
            kafka_bootstrap=endpoints.kafka_bootstrap,
            env={
                "DTX_GATEWAY_PORT": str(gateway_port),
                "DTX_JWT_SECRET": local_jwt_secret(infra.state_dir),
                "DTX_ALLOW_UNCOORDINATED": "true",
                **(
                    {"OTEL_EXPORTER_OTLP_ENDPOINT": os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"]}
                    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                    else {}
                ),
            },
        ).build()

    async def when_up(system: LocalSystem) -> None:
        say(console, "pids: " + ", ".join(f"{k} {p.pid}" for k, p in system.procs.items()), "")
        say(console, f"dtx is up: gateway at {url} (docs: {url}/docs)", "bold green")
        if after_start is not None:
            await after_start(url, system.env["DTX_JWT_SECRET"])
        say(console, f"gateway serving at {url} — Ctrl-C stops everything", "bold green")

    await run_system(infra, make_system, console, stop, keep_infra=keep_infra, when_up=when_up)

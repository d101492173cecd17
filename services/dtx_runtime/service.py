"""The lifecycle every service shares: start, serve, drain on SIGTERM, exit 0.

Order matters. On the way up the database is migrated before the gRPC port
opens, so no call meets an old schema. On the way down the service first
reports NOT_SERVING (so Kubernetes stops routing to it), then lets in-flight
calls finish within the grace period, then stops background work, and only
then closes the pool those calls were using.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import asyncpg
import grpc
import uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from dtx_runtime import telemetry
from dtx_runtime.database import create_pool, migrate
from dtx_runtime.errors import DtxError
from dtx_runtime.grpc_metrics import MetricsInterceptor
from dtx_runtime.health import Health, Phase
from dtx_runtime.http import SidePort
from dtx_runtime.logs import configure_logging
from dtx_runtime.settings import ServiceSettings, load_settings

log = logging.getLogger(__name__)

S = TypeVar("S", bound=ServiceSettings)

HEALTH_POLL_SECONDS = 2.0


@dataclass
class ServiceContext(Generic[S]):
    """What a service's ``setup`` gets to register its parts on."""

    settings: S
    server: grpc.aio.Server
    health: Health
    side_port: SidePort
    pool: asyncpg.Pool | None = None
    _background: list[tuple[str, Callable[[], Coroutine[Any, Any, None]]]] = field(
        default_factory=list
    )
    _on_shutdown: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    @property
    def db(self) -> asyncpg.Pool:
        """The pool; a service that declared migrations always has one."""
        if self.pool is None:
            raise DtxError(f"{self.settings.service_name} has no database configured")
        return self.pool

    def run_in_background(
        self, name: str, factory: Callable[[], Coroutine[Any, Any, None]]
    ) -> None:
        """A loop (relay, reaper, recovery) started after the server and cancelled on shutdown."""
        self._background.append((name, factory))

    def on_shutdown(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Called after in-flight calls drained and background work stopped."""
        self._on_shutdown.append(callback)


@dataclass(frozen=True)
class ServiceDefinition(Generic[S]):
    """A service: its name, settings type, migrations and how to wire its servicers.

    ``migrations`` maps a component name to its directory, applied in order:
    for a participant ``{"barrier": BARRIER_MIGRATIONS, "payments": ...}``.
    A service with migrations gets a database pool and a readiness check on it.
    """

    name: str
    settings_type: type[S]
    setup: Callable[[ServiceContext[S]], Awaitable[None]]
    grpc_services: Sequence[str]
    migrations: Mapping[str, Path] = field(default_factory=dict)


async def serve(
    definition: ServiceDefinition[S],
    settings: S | None = None,
    *,
    stop: asyncio.Event | None = None,
) -> None:
    """Run a service until SIGTERM/SIGINT (or ``stop`` is set), then drain and return."""
    settings = settings or load_settings(definition.settings_type)
    configure_logging(settings.service_name, settings.log_level)
    telemetry.configure_tracing(settings.service_name, settings.otlp_endpoint)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)

    health_state = Health()
    side_port = SidePort(health_state, settings.bind_host, settings.http_port)
    server = grpc.aio.server(
        interceptors=[MetricsInterceptor(), *telemetry.server_interceptors()],
        options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 4 * 1024 * 1024)],
    )
    ctx: ServiceContext[S] = ServiceContext(settings, server, health_state, side_port)

    if definition.migrations:
        if not settings.database_url:
            raise DtxError(f"DTX_DATABASE_URL is required by {definition.name}")
        ctx.pool = await create_pool(
            settings.database_url,
            min_size=min(settings.db_pool_min, settings.db_pool_max),
            max_size=settings.db_pool_max,
            connect_timeout_s=settings.db_connect_timeout_seconds,
        )
        await migrate(ctx.pool, definition.migrations, scope=definition.name)
        pool = ctx.pool

        async def database_answers() -> None:
            async with pool.acquire(timeout=2) as conn:
                await conn.fetchval("SELECT 1")

        health_state.add_check("database", database_answers)

    await definition.setup(ctx)

    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [*definition.grpc_services, health.SERVICE_NAME, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    address = f"{settings.bind_host}:{settings.grpc_port}"
    try:
        server.add_insecure_port(address)
    except RuntimeError as exc:
        raise DtxError(f"cannot listen on {address} (gRPC): {exc}") from None
    await server.start()
    try:
        await side_port.start()
    except OSError as exc:
        await server.stop(0)
        raise DtxError(
            f"cannot listen on {settings.bind_host}:{settings.http_port} (HTTP): {exc.strerror}"
        ) from None
    health_state.phase = Phase.SERVING
    # Everything allocated so far lives as long as the process: keep it out of
    # the collector's generations, so full collections stay short on the hot path.
    gc.collect()
    gc.freeze()
    tasks = [asyncio.create_task(factory(), name=name) for name, factory in ctx._background]
    watcher = asyncio.create_task(
        _mirror_health(health_state, health_servicer, definition.grpc_services)
    )
    log.info(
        "serving",
        extra={"grpc": address, "http": f"{settings.bind_host}:{settings.http_port}"},
    )

    await stop.wait()

    log.info("draining", extra={"grace_seconds": settings.shutdown_grace_seconds})
    health_state.phase = Phase.DRAINING
    await _set_all(
        health_servicer, definition.grpc_services, health_pb2.HealthCheckResponse.NOT_SERVING
    )
    await server.stop(settings.shutdown_grace_seconds)
    for task in [*tasks, watcher]:
        task.cancel()
    await asyncio.wait([*tasks, watcher], timeout=settings.shutdown_grace_seconds or 1)
    for callback in reversed(ctx._on_shutdown):
        try:
            await asyncio.wait_for(callback(), timeout=10)
        except Exception:
            log.exception("shutdown callback failed")
    await side_port.stop()
    if ctx.pool is not None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(ctx.pool.close(), timeout=10)
    telemetry.shutdown_tracing()
    log.info("stopped")


async def _set_all(servicer: HealthServicer, services: Sequence[str], status: int) -> None:
    for name in ("", *services):
        await servicer.set(name, status)


async def _mirror_health(state: Health, servicer: HealthServicer, services: Sequence[str]) -> None:
    """Keep the gRPC health service equal to readiness, which Kubernetes probes."""
    last: int | None = None
    while True:
        report = await state.evaluate()
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if report.ready
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        if status != last:
            await _set_all(servicer, services, status)
            if last is not None:
                log.warning("readiness changed", extra={"ready": report.ready, **report.as_dict()})
            last = status
        await asyncio.sleep(HEALTH_POLL_SECONDS)


def run_service(definition: ServiceDefinition[Any]) -> int:
    """Entry point: run until stopped; a configuration or start-up problem is one line on stderr."""
    try:
        # uvloop: libuv's event loop, in C. Each hop of a transaction is a few
        # socket reads and writes plus asyncpg's protocol; the loop's lower
        # cost per event shows directly in every order's latency (README: bench).
        uvloop.run(serve(definition))
    except DtxError as exc:
        print(f"dtx {definition.name}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0

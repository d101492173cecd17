"""Wiring of the gateway: backends over the runtime's channels, and uvicorn beside the gRPC port.

The REST port runs as a background task of the dtx service, so the runtime
stays in charge: it gives the gateway its gRPC health and side port, and on
SIGTERM the gateway reports DRAINING, stops accepting HTTP connections, lets
in-flight requests finish within the grace period, and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator

import uvicorn

from dtx_gateway.app import create_app
from dtx_gateway.backends import Backends
from dtx_gateway.config import BACKENDS, GatewaySettings
from dtx_runtime import ServiceContext, ServiceDefinition
from dtx_runtime.channels import Channels
from dtx_runtime.errors import StartupError
from dtx_runtime.health import Check, Phase

log = logging.getLogger(__name__)

DRAIN_POLL_SECONDS = 0.1


class EmbeddedServer(uvicorn.Server):
    """uvicorn without its own signal handlers: SIGTERM belongs to the dtx runtime."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind(host: str, port: int) -> socket.socket:
    """The REST listening socket, bound now so a taken port fails the start with its name."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise StartupError(
            f"cannot listen on {host}:{port} (DTX_GATEWAY_PORT): {exc.strerror}"
        ) from None
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def _checker(backends: Backends, name: str) -> Check:
    async def check() -> None:
        await backends.check(name)

    return check


async def setup(ctx: ServiceContext[GatewaySettings]) -> None:
    settings = ctx.settings
    secret = settings.secret()
    channels = Channels()
    backends = Backends.over(
        {name: channels.get(settings.endpoint(name)) for name in BACKENDS},
        call_timeout_s=settings.gateway_call_timeout_seconds,
        order_timeout_s=settings.gateway_order_timeout_seconds,
    )
    for name in settings.gateway_ready_backends:
        ctx.health.add_check(name, _checker(backends, name))

    app = create_app(
        jwt_secret=secret,
        backends=backends,
        health=ctx.health,
        max_body_bytes=settings.gateway_max_body_bytes,
    )
    sock = bind(settings.bind_host, settings.gateway_port)
    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        lifespan="off",
        server_header=False,
        timeout_graceful_shutdown=max(1, int(settings.shutdown_grace_seconds)),
    )
    server = EmbeddedServer(config)

    serving: list[asyncio.Task[None]] = []

    async def http_serving() -> None:
        if not server.started or not serving or serving[0].done():
            raise ConnectionError("the REST port is not serving")

    ctx.health.add_check("http", http_serving)

    async def run_http() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]), name="uvicorn")
        serving.append(task)
        log.info("REST serving", extra={"http": f"{settings.bind_host}:{settings.gateway_port}"})
        try:
            # The runtime has no drain event to wait on; its phase is what it offers.
            while not task.done() and ctx.health.phase is not Phase.DRAINING:  # noqa: ASYNC110
                await asyncio.sleep(DRAIN_POLL_SECONDS)
        finally:
            # Draining (or cancelled): stop accepting, let in-flight requests finish.
            server.should_exit = True
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("the REST server stopped", exc_info=task.exception())

    ctx.run_in_background("http", run_http)

    async def close() -> None:
        sock.close()
        await channels.close()

    ctx.on_shutdown(close)


SERVICE = ServiceDefinition(
    name="gateway",
    settings_type=GatewaySettings,
    setup=setup,
    grpc_services=[],
)

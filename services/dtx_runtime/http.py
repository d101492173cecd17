"""The HTTP side port: ``/metrics``, ``/healthz``, ``/readyz`` and extra JSON routes.

It is separate from the gRPC port so probes and Prometheus scrapes never queue
behind business calls, and so a service that serves no HTTP still has them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from dtx_runtime.health import Health

JsonRoute = Callable[[], Awaitable[dict[str, object]]]


class SidePort:
    def __init__(self, health: Health, host: str, port: int) -> None:
        self._health = health
        self._host = host
        self._port = port
        self._app = web.Application()
        self._app.router.add_get("/metrics", self._metrics)
        self._app.router.add_get("/healthz", self._healthz)
        self._app.router.add_get("/readyz", self._readyz)
        self._runner: web.AppRunner | None = None

    def add_json_route(self, path: str, handler: JsonRoute) -> None:
        """Expose a small JSON document, e.g. ``/status`` with the running policy hash."""

        async def respond(_: web.Request) -> web.Response:
            return web.json_response(await handler())

        self._app.router.add_get(path, respond)

    async def start(self) -> None:
        self._runner = web.AppRunner(self._app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self._host, self._port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def _healthz(self, _: web.Request) -> web.Response:
        # Liveness: the event loop answers. Dependencies belong to readiness,
        # or a database outage would restart every pod at once.
        return web.json_response({"alive": True, "phase": self._health.phase.value})

    async def _readyz(self, _: web.Request) -> web.Response:
        report = await self._health.evaluate()
        return web.json_response(report.as_dict(), status=200 if report.ready else 503)

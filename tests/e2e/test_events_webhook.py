"""The notifications webhook against a real HTTP server: retries, backoff, delivered_at, give-up."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from dtx.v1 import notifications_pb2, notifications_pb2_grpc
from dtx_runtime.outbox import delete_topics
from tests.e2e.test_events import TOPICS
from tests.support.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


class Hook:
    """Answers 500 to the first ``flaky`` POSTs of an order, and always to ``broken`` orders."""

    def __init__(self, flaky: int) -> None:
        self.flaky = flaky
        self.broken: set[str] = set()
        self.calls: list[dict[str, Any]] = []
        self.keys: list[str] = []

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.calls.append(body)
        self.keys.append(request.headers.get("Idempotency-Key", ""))
        tries = sum(1 for c in self.calls if c["order_id"] == body["order_id"])
        if body["order_id"] in self.broken or tries <= self.flaky:
            return web.Response(status=500, text="try again")
        return web.json_response({"ok": True})


@pytest.fixture
async def hook() -> AsyncIterator[tuple[Hook, str]]:
    state = Hook(flaky=2)
    app = web.Application()
    app.router.add_post("/notify", state.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield state, f"http://127.0.0.1:{port}/notify"
    finally:
        await runner.cleanup()


@pytest.fixture
async def stack(
    run_dir: Path, new_database: Callable[[str], str], infra: Any, hook: tuple[Hook, str]
) -> AsyncIterator[Stack]:
    prefix = f"t{uuid.uuid4().hex[:10]}."
    bootstrap = str(infra.kafka.bootstrap)
    system = Stack(
        run_dir,
        new_database,
        kafka_bootstrap=bootstrap,
        extra_services=("notifications",),
        env={
            "DTX_KAFKA_TOPIC_PREFIX": prefix,
            "DTX_NOTIFICATIONS_GROUP_ID": f"{prefix}notifications",
            "DTX_NOTIFICATIONS_WEBHOOK_URL": hook[1],
            "DTX_NOTIFICATIONS_WEBHOOK_BACKOFF_MS": "100",
            "DTX_NOTIFICATIONS_WEBHOOK_MAX_ATTEMPTS": "4",
        },
    ).build()
    system.start()
    try:
        yield system
    finally:
        await system.close_channels()
        system.stop()
        await delete_topics(bootstrap, [prefix + t for t in TOPICS])


async def test_webhook_retries_then_delivers_and_gives_up_after_max_attempts(
    stack: Stack, hook: tuple[Hook, str]
) -> None:
    state, _ = hook
    [account] = await stack.seed(1, 10_000, {"WIDGET": (250, 10)})
    good = await stack.place(account, {"WIDGET": 1})
    stub = notifications_pb2_grpc.NotificationsStub(stack.channel("notifications"))

    async def listed() -> list[notifications_pb2.Notification]:
        reply = await stub.ListNotifications(
            notifications_pb2.ListNotificationsRequest(account_id=account), timeout=5
        )
        return list(reply.notifications)

    async def delivered() -> bool:
        return any(n.HasField("delivered_at") for n in await listed())

    await stack.wait_until(delivered, timeout=30, what="the webhook delivery")
    [note] = await listed()
    assert note.order_id == good.id
    posts = [c for c in state.calls if c["order_id"] == good.id]
    assert len(posts) == 3  # two 500s, then 200
    assert {c["id"] for c in posts} == {note.id}
    assert posts[0]["message"] == note.message
    assert set(state.keys) == {note.id}  # Idempotency-Key: the notification's id

    bad = await stack.place(account, {"WIDGET": 1})
    state.broken.add(bad.id)

    async def gave_up() -> bool:
        rows = await stack.fetch(
            "notifications",
            "SELECT attempts, next_attempt_at, delivered_at, last_error FROM notifications"
            " WHERE order_id = $1",
            uuid.UUID(bad.id),
        )
        return bool(rows) and rows[0]["attempts"] == 4 and rows[0]["next_attempt_at"] is None

    await stack.wait_until(gave_up, timeout=30, what="the webhook to give up")
    [row] = await stack.fetch(
        "notifications",
        "SELECT delivered_at, last_error FROM notifications WHERE order_id = $1",
        uuid.UUID(bad.id),
    )
    assert row["delivered_at"] is None
    assert row["last_error"] == "HTTP 500"
    await asyncio.sleep(1)
    assert len([c for c in state.calls if c["order_id"] == bad.id]) == 4

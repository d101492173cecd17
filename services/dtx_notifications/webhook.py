"""Webhook delivery: POST each notification as JSON, with bounded retries and backoff.

A loop of its own over the undelivered rows, so consumption never waits for
the webhook. Rows are leased (``next_attempt_at`` moved forward) while a POST
is in flight, so replicas do not send the same one at once; delivery is still
at least once (a crash after the POST and before ``delivered_at`` sends it
again), which is why each request carries ``Idempotency-Key: <notification id>``.
A 2xx sets ``delivered_at``; anything else is retried after a doubling delay
until ``max_attempts``, then given up (``next_attempt_at`` NULL, ``last_error``
kept).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta

import aiohttp
import asyncpg

from dtx_notifications import domain, storage
from dtx_notifications.metrics import WEBHOOK

log = logging.getLogger(__name__)

BATCH = 20
IDLE_POLL_S = 1.0


def payload(row: asyncpg.Record) -> dict[str, object]:
    return {
        "id": str(row["id"]),
        "order_id": str(row["order_id"]),
        "account_id": str(row["account_id"]),
        "event_type": row["event_type"],
        "message": row["message"],
        "created_at": row["created_at"].isoformat(),
    }


class WebhookDelivery:
    def __init__(
        self,
        pool: asyncpg.Pool,
        url: str,
        *,
        timeout_s: float,
        max_attempts: int,
        backoff_initial_s: float,
        backoff_max_s: float,
        idle_poll_s: float = IDLE_POLL_S,
    ) -> None:
        self._pool = pool
        self._url = url
        self._timeout_s = timeout_s
        self._max_attempts = max_attempts
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._idle_poll_s = idle_poll_s
        self._wake = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self._timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                self._wake.clear()
                try:
                    sent = await self.deliver_once(session)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("webhook delivery pass failed: %s", exc)
                    sent = 0
                if sent:
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._idle_poll_s)

    async def deliver_once(self, session: aiohttp.ClientSession) -> int:
        """One batch of due notifications; how many were attempted."""
        lease = timedelta(seconds=self._timeout_s * 2 + 5)
        async with self._pool.acquire() as conn:
            rows = await storage.claim_due(conn, BATCH, lease)
        if rows:
            await asyncio.gather(*(self._deliver(session, row) for row in rows))
        return len(rows)

    async def _deliver(self, session: aiohttp.ClientSession, row: asyncpg.Record) -> None:
        error: str | None = None
        try:
            async with session.post(
                self._url,
                json=payload(row),
                headers={"Idempotency-Key": str(row["id"])},
            ) as response:
                if not 200 <= response.status < 300:
                    error = f"HTTP {response.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        async with self._pool.acquire() as conn:
            if error is None:
                await storage.mark_delivered(conn, row["id"])
                WEBHOOK.labels("delivered").inc()
                return
            attempts = row["attempts"] + 1
            if attempts >= self._max_attempts:
                await storage.mark_failed(conn, row["id"], error, None)
                WEBHOOK.labels("gave_up").inc()
                log.warning(
                    "webhook gave up on notification %s after %d attempts: %s",
                    row["id"],
                    attempts,
                    error,
                )
                return
            delay = domain.retry_delay_s(attempts, self._backoff_initial_s, self._backoff_max_s)
            await storage.mark_failed(conn, row["id"], error, timedelta(seconds=delay))
            WEBHOOK.labels("failed").inc()

"""Kafka plumbing shared by the outbox relay and the inbox consumers.

A readiness probe, topic creation and deletion, and the capped exponential backoff with
jitter that every loop here uses when Kafka or PostgreSQL is away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Iterable, Sequence
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.client import AIOKafkaClient

log = logging.getLogger(__name__)

TOPIC_ALREADY_EXISTS = 36


class Backoff:
    """Capped exponential delays with ±20 % jitter; :meth:`reset` after a success."""

    def __init__(self, initial_s: float = 0.1, maximum_s: float = 5.0) -> None:
        self._initial = initial_s
        self._maximum = maximum_s
        self._next = initial_s

    def next_delay(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, self._maximum)
        return delay * random.uniform(0.8, 1.2)

    async def wait(self) -> None:
        await asyncio.sleep(self.next_delay())

    def reset(self) -> None:
        self._next = self._initial


class KafkaProbe:
    """Readiness: one metadata round trip on a kept client; raises when Kafka does not answer."""

    def __init__(self, bootstrap: str, *, timeout_s: float = 2.0) -> None:
        self._bootstrap = bootstrap
        self._timeout_s = timeout_s
        self._client: Any = None

    async def check(self) -> None:
        if self._client is None:
            client = AIOKafkaClient(
                bootstrap_servers=self._bootstrap,
                request_timeout_ms=int(self._timeout_s * 1000),
                client_id="dtx-readiness",
            )
            try:
                await client.bootstrap()
            except BaseException:
                await client.close()
                raise
            self._client = client
        metadata = await self._client.fetch_all_metadata()
        if not metadata.brokers():
            raise ConnectionError(f"Kafka at {self._bootstrap} lists no broker")

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()


async def ensure_topics(
    bootstrap: str,
    topics: Sequence[str],
    *,
    partitions: int = 3,
    replication_factor: int = 1,
    timeout_s: float = 20.0,
) -> None:
    """Create the topics that do not exist yet (an existing topic is left as it is)."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000)
    )
    await asyncio.wait_for(admin.start(), timeout_s)
    try:
        existing = set(await asyncio.wait_for(admin.list_topics(), timeout_s))
        missing = [t for t in dict.fromkeys(topics) if t not in existing]
        if not missing:
            return
        response = await asyncio.wait_for(
            admin.create_topics(
                [
                    NewTopic(t, num_partitions=partitions, replication_factor=replication_factor)
                    for t in missing
                ]
            ),
            timeout_s,
        )
        for error in getattr(response, "topic_errors", ()):
            topic, code = error[0], error[1]
            if code not in (0, TOPIC_ALREADY_EXISTS):
                raise ConnectionError(f"cannot create Kafka topic {topic}: error code {code}")
        log.info("created Kafka topics %s", missing)
    finally:
        await admin.close()


async def delete_topics(
    bootstrap: str,
    topics: Iterable[str] = (),
    *,
    prefix: str | None = None,
    timeout_s: float = 20.0,
) -> list[str]:
    """Delete those of ``topics`` that exist, and with ``prefix`` every topic named so.

    A cleanup (of a benchmark's or a test's own topics): it never raises, and
    returns what it deleted. Topics left behind cost a broker memory, files and
    time on every metadata request.
    """
    wanted = set(topics)
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000)
    )
    gone: list[str] = []
    with contextlib.suppress(Exception):
        await asyncio.wait_for(admin.start(), timeout_s)
        existing = await asyncio.wait_for(admin.list_topics(), timeout_s)
        gone = sorted(
            t for t in existing if t in wanted or (prefix is not None and t.startswith(prefix))
        )
        if gone:
            await asyncio.wait_for(admin.delete_topics(gone), timeout_s)
    with contextlib.suppress(Exception):
        await admin.close()
    return gone

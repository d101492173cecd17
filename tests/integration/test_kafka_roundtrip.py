"""Kafka as the services use it: keyed records with headers, manual commits in a consumer group."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

PARTITIONS = 3
COUNT = 20


@pytest.fixture
def bootstrap(infra: object) -> str:
    return str(infra.endpoints().kafka_bootstrap)  # type: ignore[attr-defined]


@pytest.fixture
async def topic(bootstrap: str) -> AsyncIterator[str]:
    name = f"dtx-test-roundtrip-{uuid.uuid4().hex[:10]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await asyncio.wait_for(admin.start(), 20)
    try:
        await asyncio.wait_for(
            admin.create_topics([NewTopic(name, num_partitions=PARTITIONS, replication_factor=1)]),
            20,
        )
        # Metadata propagates asynchronously, most visibly on a broker that just started.
        for _ in range(100):  # up to ~20 s
            if name in await asyncio.wait_for(admin.list_topics(), 20):
                break
            await asyncio.sleep(0.2)
        else:
            raise AssertionError(f"topic {name} not listed within 20 s of its creation")
        yield name
        await asyncio.wait_for(admin.delete_topics([name]), 20)
    finally:
        await admin.close()


def _consumer(bootstrap: str, topic: str, group: str) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=10_000,
        heartbeat_interval_ms=1_000,
        request_timeout_ms=15_000,
    )


async def _read(consumer: AIOKafkaConsumer, want: int, timeout_s: float) -> list[ConsumerRecord]:
    """Poll until ``want`` records came, or the time is up (then return what came)."""
    records: list[ConsumerRecord] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while len(records) < want and loop.time() < deadline:
        batches = await consumer.getmany(timeout_ms=500)
        for batch in batches.values():
            records.extend(batch)
    return records


async def test_records_keep_keys_and_headers_and_committed_offsets_hold(
    bootstrap: str, topic: str
) -> None:
    sent: dict[str, tuple[bytes, dict[str, bytes]]] = {}
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, request_timeout_ms=15_000
    )
    await asyncio.wait_for(producer.start(), 20)
    try:
        for i in range(COUNT):
            key = f"order-{i % 7}"
            trace_id = uuid.uuid4().hex
            headers = {
                "traceparent": f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01".encode(),
                "event-type": (b"OrderPlaced" if i % 2 == 0 else b"PaymentCaptured"),
                "sequence": str(i).encode(),
            }
            value = f'{{"n": {i}}}'.encode()
            await asyncio.wait_for(
                producer.send_and_wait(
                    topic, value=value, key=key.encode(), headers=list(headers.items())
                ),
                20,
            )
            sent[str(i)] = (key.encode(), headers)
    finally:
        await producer.stop()

    group = f"dtx-test-group-{uuid.uuid4().hex[:8]}"
    first = _consumer(bootstrap, topic, group)
    await asyncio.wait_for(first.start(), 30)
    try:
        records = await _read(first, COUNT, timeout_s=45)
        assert len(records) == COUNT, f"got {len(records)} of {COUNT} records"
        seen = set()
        for record in records:
            headers = {k: v for k, v in record.headers}
            sequence = headers["sequence"].decode()
            sent_key, expected = sent[sequence]
            assert record.key == sent_key
            assert headers == expected
            assert record.value == f'{{"n": {sequence}}}'.encode()
            seen.add(sequence)
        assert seen == set(sent)
        # One key lands in one partition, so per-key order is the send order.
        by_key: dict[bytes, list[int]] = {}
        for record in sorted(records, key=lambda r: (r.partition, r.offset)):
            by_key.setdefault(record.key, []).append(int(dict(record.headers)["sequence"]))
        assert all(seqs == sorted(seqs) for seqs in by_key.values())
        assert len({(r.key, r.partition) for r in records}) == len(by_key)

        await asyncio.wait_for(first.commit(), 20)
        committed = {
            tp: await first.committed(tp)
            for tp in (TopicPartition(topic, p) for p in range(PARTITIONS))
        }
        assert sum(offset or 0 for offset in committed.values()) == COUNT
    finally:
        await first.stop()

    # A second member of the group resumes at the committed offsets: nothing old comes again.
    second = _consumer(bootstrap, topic, group)
    await asyncio.wait_for(second.start(), 30)
    try:
        leftovers = await _read(second, 1, timeout_s=8)
        assert leftovers == []
        # ...but it does get what is produced afterwards, so it was really consuming.
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await asyncio.wait_for(producer.start(), 20)
        try:
            await asyncio.wait_for(
                producer.send_and_wait(
                    topic, value=b"late", key=b"order-late", headers=[("event-type", b"Late")]
                ),
                20,
            )
        finally:
            await producer.stop()
        late = await _read(second, 1, timeout_s=30)
        assert [(r.key, r.value, r.headers) for r in late] == [
            (b"order-late", b"late", (("event-type", b"Late"),))
        ]
    finally:
        await second.stop()


async def test_uncommitted_records_are_delivered_again(bootstrap: str, topic: str) -> None:
    """The other half of manual commits: what was read but not committed comes back."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await asyncio.wait_for(producer.start(), 20)
    try:
        for i in range(5):
            await asyncio.wait_for(
                producer.send_and_wait(topic, value=str(i).encode(), key=b"k", partition=0), 20
            )
    finally:
        await producer.stop()

    group = f"dtx-test-group-{uuid.uuid4().hex[:8]}"
    first = _consumer(bootstrap, topic, group)
    await asyncio.wait_for(first.start(), 30)
    try:
        records = await _read(first, 5, timeout_s=45)
        assert [r.value for r in records] == [b"0", b"1", b"2", b"3", b"4"]
        # commit only the first two (the offset committed is the next one to read)
        await asyncio.wait_for(first.commit({TopicPartition(topic, 0): records[1].offset + 1}), 20)
    finally:
        await first.stop()

    second = _consumer(bootstrap, topic, group)
    await asyncio.wait_for(second.start(), 30)
    try:
        again = await _read(second, 3, timeout_s=45)
        assert [r.value for r in again] == [b"2", b"3", b"4"]
    finally:
        await second.stop()

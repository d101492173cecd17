"""``LocalInfra`` against the real servers, in a private state dir on private ports.

The module runs its own PostgreSQL and Kafka (temporary state dir, ports the kernel hands
out) so that it never touches a developer's instance or the shared test session's. The tests
run in file order and share one instance; the last one takes it down and up again.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from typer.testing import CliRunner

from dtx_infra import SERVICE_DATABASES, LocalInfra
from dtx_infra.cli import infra_app
from dtx_infra.ports import free_ports, port_is_free
from dtx_infra.procs import pid_alive

pytestmark = pytest.mark.integration


def _free_ports(count: int) -> list[int]:
    return free_ports(count)


@pytest.fixture(scope="module")
def infra() -> Iterator[LocalInfra]:
    # /tmp rather than pytest's tmp_path: pytest's base dir is mode 0700, which the postgres
    # system user (PostgreSQL runs as it when we are root) cannot traverse.
    state = Path(tempfile.mkdtemp(prefix="dtx-infra-it-"))
    state.chmod(0o755)
    pg_port, kafka_port, controller_port = _free_ports(3)
    local = LocalInfra(
        state, pg_port=pg_port, kafka_port=kafka_port, kafka_controller_port=controller_port
    )
    try:
        yield local
    finally:
        try:
            local.down()
        finally:
            shutil.rmtree(state, ignore_errors=True)


def _pids(infra: LocalInfra) -> tuple[int | None, int | None]:
    st = infra.status()
    return st.postgres.pid, st.kafka.pid


def test_up_twice_is_a_noop(infra: LocalInfra) -> None:
    first = infra.up(timeout_s=180)
    pids = _pids(infra)
    assert all(pid is not None for pid in pids)
    assert first.postgres_port == infra.settings.pg_port
    assert first.kafka_bootstrap == f"127.0.0.1:{infra.settings.kafka_port}"

    started = time.monotonic()
    second = infra.up()
    elapsed = time.monotonic() - started

    assert second == first
    assert _pids(infra) == pids
    assert elapsed < 1.0, f"second up() took {elapsed:.2f}s"
    assert infra.status().all_running


async def test_service_databases_exist_with_2pc_settings(infra: LocalInfra) -> None:
    eps = infra.up()
    for name in SERVICE_DATABASES:
        conn = await asyncpg.connect(eps.dsn(name), timeout=10)
        try:
            assert await conn.fetchval("SELECT current_database()") == name
        finally:
            await conn.close()

    conn = await asyncpg.connect(eps.dsn("payments"), timeout=10)
    try:
        assert await conn.fetchval("SHOW max_prepared_transactions") == "256"
        assert await conn.fetchval("SHOW max_connections") == "300"
        assert await conn.fetchval("SHOW listen_addresses") == "127.0.0.1"
        assert await conn.fetchval("SHOW fsync") == "on"
        assert await conn.fetchval("SHOW synchronous_commit") == "on"
        # The point of the settings: a prepared transaction survives and can be committed.
        await conn.execute("BEGIN")
        await conn.execute("SELECT 1")
        await conn.execute("PREPARE TRANSACTION 'dtx-infra-it'")
        assert await conn.fetchval("SELECT count(*) FROM pg_prepared_xacts") == 1
        await conn.execute("COMMIT PREPARED 'dtx-infra-it'")
    finally:
        await conn.close()


async def test_kafka_answers_metadata_and_round_trips(infra: LocalInfra) -> None:
    eps = infra.up()
    admin = AIOKafkaAdminClient(bootstrap_servers=eps.kafka_bootstrap, request_timeout_ms=10000)
    await admin.start()
    try:
        cluster = await admin.describe_cluster()
        assert [b["port"] for b in cluster["brokers"]] == [infra.settings.kafka_port]
    finally:
        await admin.close()

    topic = "dtx-infra-it"  # auto-created: the outbox relies on it
    producer = AIOKafkaProducer(bootstrap_servers=eps.kafka_bootstrap, enable_idempotence=True)
    await producer.start()
    try:
        meta = await producer.send_and_wait(topic, b"hello", key=b"k", partition=0)
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        bootstrap_servers=eps.kafka_bootstrap, group_id=None, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek(tp, meta.offset)
        record = await consumer.getone()
        assert (record.key, record.value) == (b"k", b"hello")
        assert len(consumer.partitions_for_topic(topic) or ()) == 3  # num.partitions
    finally:
        await consumer.stop()


async def test_create_and_drop_database(infra: LocalInfra) -> None:
    infra.up()
    name = "dtx_infra_scratch"
    infra.postgres.create_database(name)
    infra.postgres.create_database(name)  # idempotent
    conn = await asyncpg.connect(infra.postgres.dsn(name), timeout=10)
    try:
        # A leftover prepared transaction must not block the drop.
        await conn.execute("BEGIN")
        await conn.execute("SELECT 1")
        await conn.execute("PREPARE TRANSACTION 'left-behind'")
    finally:
        await conn.close()
    infra.postgres.drop_database(name)
    infra.postgres.drop_database(name)  # idempotent
    conn = await asyncpg.connect(infra.postgres.dsn("postgres"), timeout=10)
    try:
        assert await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name) is None
    finally:
        await conn.close()


def test_cli_status_reports_running(infra: LocalInfra) -> None:
    infra.up()
    env = {
        "DTX_STATE_DIR": str(infra.state_dir),
        "DTX_PG_PORT": str(infra.settings.pg_port),
        "DTX_KAFKA_PORT": str(infra.settings.kafka_port),
        "DTX_KAFKA_CONTROLLER_PORT": str(infra.settings.kafka_controller_port),
    }
    result = CliRunner().invoke(infra_app, ["status"], env=env)
    assert result.exit_code == 0, result.output
    assert result.stdout.count("running") == 2
    for pid in _pids(infra):
        assert str(pid) in result.stdout


def _processes_under(path: Path) -> list[int]:
    """PIDs whose cwd or command line mentions ``path`` (PostgreSQL chdirs to its data dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
            args = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if (cwd.startswith(str(path)) or str(path) in args) and pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def test_down_leaves_nothing_and_up_works_again(infra: LocalInfra) -> None:
    infra.up()
    pids = [pid for pid in _pids(infra) if pid is not None]
    assert len(pids) == 2

    infra.down()

    assert not any(pid_alive(pid) for pid in pids)
    assert _processes_under(infra.state_dir) == []
    ports = (
        infra.settings.pg_port,
        infra.settings.kafka_port,
        infra.settings.kafka_controller_port,
    )
    assert all(port_is_free(port) for port in ports)
    st = infra.status()
    assert not st.postgres.running
    assert not st.kafka.running
    infra.down()  # a second down is a no-op

    eps = infra.up(timeout_s=180)
    assert infra.status().all_running
    assert set(_pids(infra)).isdisjoint(pids)
    assert eps.postgres_port == infra.settings.pg_port

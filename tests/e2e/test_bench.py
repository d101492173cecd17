"""``dtx bench`` end to end, briefly: every path measured on a real system, nothing failing.

The figures themselves are the benchmark's business (README: Benchmark); this
only shows that the script runs all four paths on real services and reports
what it promises — rates, latencies, the ratio to the baseline and each
service's memory — so a change that breaks it is caught here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from dtx_cli.bench import run_bench
from dtx_infra import LocalInfra


async def bench_topics(bootstrap: str) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        return {t for t in await admin.list_topics() if t.startswith("bench-")}
    finally:
        await admin.close()


pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


async def test_every_path_is_measured_without_errors(infra: LocalInfra, tmp_path: Path) -> None:
    before = await bench_topics(infra.kafka.bootstrap)
    report = await run_bench(
        infra,
        tmp_path,
        concurrency=2,
        seconds=1.0,
        paths=("direct", "2pc", "saga", "local"),
        progress=lambda _: None,
        settle_pause_s=0.1,
    )

    assert [r.path for r in report.results] == ["direct", "2pc", "saga", "local"]
    for result in report.results:
        assert result.errors == 0, result
        assert result.peak_orders_per_s > 0, result
        assert abs(result.half_rate - max(1.0, result.peak_orders_per_s / 2)) <= 0.1, result
        assert 0 < result.p50_ms <= result.p95_ms <= result.p99_ms, result
        assert result.ratio_to_direct is not None
        # The machine was measured over the half-rate phase: it ran the load.
        assert 0 < result.cpu_busy_percent <= 100, result
        assert 0 <= result.cpu_steal_percent <= 100 - result.cpu_busy_percent, result
        # The empty steps were timed too: a PostgreSQL round trip on every path,
        # a gRPC call wherever there are services to call.
        assert 0 < result.hop_pg_p50_ms <= result.hop_pg_p99_ms, result
        if result.path == "local":
            assert result.hop_grpc_p50_ms == 0, result
        else:
            assert 0 < result.hop_grpc_p50_ms <= result.hop_grpc_p99_ms, result
    assert report.results[0].ratio_to_direct == 1.0
    assert set(report.peak_rss_mb) == {"coordinator", "orders", "payments", "inventory", "saga"}
    assert all(0 < mb < 500 for mb in report.peak_rss_mb.values())
    # The run's Kafka topics (created by its services) are gone with it.
    assert await bench_topics(infra.kafka.bootstrap) <= before

"""Readiness: the service phase plus dependency checks evaluated concurrently with a timeout."""

from __future__ import annotations

import asyncio
import time

import pytest

from dtx_runtime.health import Health, Phase, ReadinessReport

pytestmark = pytest.mark.unit


async def ok() -> None:
    return None


async def refused() -> None:
    raise ConnectionRefusedError("connect to 127.0.0.1:5432 refused")


async def bare_failure() -> None:
    raise RuntimeError


async def hangs() -> None:
    await asyncio.sleep(60)


async def test_starting_is_not_ready_even_with_healthy_checks() -> None:
    health = Health()
    health.add_check("database", ok)

    report = await health.evaluate()

    assert report.phase is Phase.STARTING
    assert not report.ready
    assert report.failures == {}


async def test_serving_with_all_checks_ok_is_ready() -> None:
    health = Health()
    health.add_check("database", ok)
    health.add_check("kafka", ok)
    health.phase = Phase.SERVING

    report = await health.evaluate()

    assert report.ready
    assert report.as_dict() == {"ready": True, "phase": "serving", "failures": {}}


async def test_serving_without_checks_is_ready() -> None:
    health = Health()
    health.phase = Phase.SERVING
    assert (await health.evaluate()).ready


async def test_a_failing_check_makes_it_unready_with_its_message() -> None:
    health = Health()
    health.add_check("database", refused)
    health.add_check("kafka", ok)
    health.add_check("cache", bare_failure)
    health.phase = Phase.SERVING

    report = await health.evaluate()

    assert not report.ready
    assert report.failures == {
        "database": "ConnectionRefusedError: connect to 127.0.0.1:5432 refused",
        "cache": "RuntimeError",
    }
    assert report.as_dict()["ready"] is False


async def test_a_slow_check_fails_after_the_timeout() -> None:
    health = Health(check_timeout_s=0.05)
    health.add_check("database", hangs)
    health.add_check("kafka", ok)
    health.phase = Phase.SERVING

    started = time.monotonic()
    report = await health.evaluate()
    elapsed = time.monotonic() - started

    assert not report.ready
    assert report.failures == {"database": "no answer within 0.05 s"}
    assert elapsed < 1.0


async def test_checks_run_concurrently() -> None:
    """Three slow checks cost one timeout, not three: a probe must answer in time."""
    health = Health(check_timeout_s=0.3)
    for name in ("a", "b", "c"):
        health.add_check(name, hangs)
    health.phase = Phase.SERVING

    started = time.monotonic()
    report = await health.evaluate()
    elapsed = time.monotonic() - started

    assert set(report.failures) == {"a", "b", "c"}
    assert elapsed < 0.8


async def test_a_recovered_check_makes_it_ready_again() -> None:
    state = {"up": False}

    async def flaky() -> None:
        if not state["up"]:
            raise OSError("down")

    health = Health()
    health.add_check("database", flaky)
    health.phase = Phase.SERVING
    assert not (await health.evaluate()).ready

    state["up"] = True
    assert (await health.evaluate()).ready


async def test_draining_is_not_ready_even_with_healthy_checks() -> None:
    health = Health()
    health.add_check("database", ok)
    health.phase = Phase.SERVING
    assert (await health.evaluate()).ready

    health.phase = Phase.DRAINING
    report = await health.evaluate()

    assert not report.ready
    assert report.failures == {}
    assert report.as_dict()["phase"] == "draining"


def test_report_readiness_by_phase() -> None:
    assert ReadinessReport(Phase.SERVING).ready
    assert not ReadinessReport(Phase.SERVING, {"db": "down"}).ready
    assert not ReadinessReport(Phase.STARTING).ready
    assert not ReadinessReport(Phase.DRAINING).ready

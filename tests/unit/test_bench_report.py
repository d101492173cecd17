"""The benchmark's own arithmetic: percentiles and the machine's CPU over a phase."""

from __future__ import annotations

from dtx_cli.bench import CpuTimes, _pct


def test_cpu_percentages_are_of_the_time_elapsed_between_two_readings() -> None:
    before = CpuTimes(busy=1_000, steal=100, total=4_000)
    after = CpuTimes(busy=1_600, steal=200, total=5_000)
    assert after.percent_since(before) == (60.0, 10.0)


def test_cpu_percentages_without_an_earlier_reading_or_elapsed_time_are_zero() -> None:
    now = CpuTimes(busy=10, steal=0, total=20)
    assert now.percent_since(None) == (0.0, 0.0)
    assert now.percent_since(now) == (0.0, 0.0)


def test_this_machine_reports_its_cpu_times() -> None:
    reading = CpuTimes.now()
    assert reading is not None  # the tests run on Linux
    assert 0 < reading.busy < reading.total
    assert 0 <= reading.steal < reading.total


def test_percentiles_are_in_milliseconds_and_nearest_rank() -> None:
    samples = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    assert _pct(samples, 0.5) == 51.0
    assert _pct(samples, 0.99) == 100.0
    assert _pct([], 0.99) == 0.0

"""Failpoints: armed from the environment, refused when malformed, free when unarmed."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from dtx_runtime.failpoints import _parse, failpoint

pytestmark = pytest.mark.unit


def test_specs_parse_into_actions() -> None:
    assert _parse("a.b=kill; c=sleep(250)") == {"a.b": "kill", "c": "sleep(250)"}
    assert _parse("") == {}


@pytest.mark.parametrize("spec", ["a", "a=explode", "a=sleep(x)", "a=sleep(99999999)"])
def test_malformed_specs_name_the_item(spec: str) -> None:
    with pytest.raises(ValueError, match="DTX_FAILPOINTS"):
        _parse(spec)


async def test_an_unarmed_failpoint_does_nothing() -> None:
    start = time.perf_counter()
    await failpoint("nowhere")
    assert time.perf_counter() - start < 0.01


def test_kill_really_sigkills_the_process() -> None:
    code = "import asyncio; from dtx_runtime.failpoints import failpoint; asyncio.run(failpoint('x')); print('alive')"
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={"DTX_FAILPOINTS": "x=kill", "PYTHONPATH": ":".join(sys.path)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == -9
    assert "alive" not in result.stdout


def test_sleep_stalls_for_the_given_time() -> None:
    code = "import asyncio,time; from dtx_runtime.failpoints import failpoint; t=time.perf_counter(); asyncio.run(failpoint('y')); print(time.perf_counter()-t)"
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={"DTX_FAILPOINTS": "y=sleep(300)", "PYTHONPATH": ":".join(sys.path)},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert 0.29 <= float(result.stdout) < 2

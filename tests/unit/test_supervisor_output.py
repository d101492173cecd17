"""``dtx up``'s supervisor: service output printed verbatim, and a stop whatever fails (issue 14).

A service line holding ``[/dtx.v1.Orders/PlaceOrder]`` was read as rich markup
and crashed the supervisor before its cleanup, leaving PostgreSQL and Kafka running.
"""

from __future__ import annotations

import asyncio
import io
import json
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from rich.console import Console
from rich.errors import MarkupError

from dtx_cli.local import follow_logs, print_service_line, render_line, run_system
from dtx_cli.system import LocalSystem
from dtx_infra import Endpoints

pytestmark = pytest.mark.unit

TRICKY = [
    "[/dtx.v1.Orders/PlaceOrder]",
    "[bold]",
    "[red]x[/]",
    "call [/dtx.v1.Orders/PlaceOrder] failed: [link=http://x]y",
    ":smile: 127.0.0.1:8080 'quoted' None True",
    "\\[escaped] and a trailing backslash \\",
]


def captured(width: int = 20, *, colour: bool = False) -> tuple[Console, io.StringIO]:
    """A console writing to a buffer; narrow, so any wrapping would show."""
    out = io.StringIO()
    if colour:
        return Console(file=out, width=width, force_terminal=True, color_system="standard"), out
    return Console(file=out, width=width, force_terminal=False, color_system=None), out


@pytest.mark.parametrize("line", TRICKY)
def test_a_service_line_is_printed_verbatim(line: str) -> None:
    console, out = captured()
    print_service_line(console, "orders ", "cyan", line)
    assert out.getvalue() == f"orders  | {line}\n"


@pytest.mark.parametrize("line", TRICKY)
def test_on_a_colour_terminal_only_the_prefix_is_styled(line: str) -> None:
    console, out = captured(colour=True)
    print_service_line(console, "orders", "cyan", line)
    assert out.getvalue().endswith(f" | {line}\n")  # no escape codes inside the line


def system_with(tmp_path: Path, *services: str) -> LocalSystem:
    """A real LocalSystem, built without databases: nothing is started by building it."""
    return LocalSystem(tmp_path / "logs", lambda name: "", services=services).build()


async def until(predicate: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_followed_logs_come_out_verbatim_whole_lines_only(tmp_path: Path) -> None:
    system = system_with(tmp_path, "orders")
    log = system.procs["orders"].log_path
    log.parent.mkdir(parents=True)
    record = {"level": "INFO", "message": "[/dtx.v1.Orders/PlaceOrder] done", "method": "[bold]"}
    log.write_text("\n".join([*TRICKY, json.dumps(record)]) + "\n" + '{"level": "INFO", "mess')
    console, out = captured()
    done = asyncio.Event()
    follower = asyncio.create_task(follow_logs(system, console, done))

    await until(lambda: out.getvalue().count("\n") == len(TRICKY) + 1)
    with log.open("a") as handle:  # the half-written record is completed later
        handle.write('age": "[red]x[/]"}\n')
    done.set()
    await follower  # raises nothing, and takes one last look after ``done``

    expected = [*TRICKY, render_line("orders", json.dumps(record)), "INFO    [red]x[/]"]
    assert out.getvalue().splitlines() == [f"orders | {line}" for line in expected]
    assert "INFO    [/dtx.v1.Orders/PlaceOrder] done method=[bold]" in expected


@dataclass
class RecordingInfra:
    """Stands in for PostgreSQL and Kafka: the supervisor's calls are what is tested."""

    calls: list[str] = field(default_factory=list)

    def up(self) -> Endpoints:
        self.calls.append("up")
        return Endpoints("127.0.0.1", 1, "dtx", "127.0.0.1:1")

    def down(self) -> None:
        self.calls.append("down")


def broken_printer(console: Console, prefix: str, style: str, text: str) -> None:
    raise MarkupError(f"closing tag {text!r} at position 93 doesn't match any open tag")


async def test_a_printer_that_raises_still_stops_the_services_and_the_infra(
    tmp_path: Path,
) -> None:
    infra = RecordingInfra()
    systems: list[LocalSystem] = []

    def make_system(endpoints: Endpoints) -> LocalSystem:
        system = system_with(tmp_path, "orders")
        # A real child process that logs a gRPC method name and never becomes ready.
        system.procs["orders"].argv = [
            sys.executable,
            "-c",
            "import time; print('[/dtx.v1.Orders/PlaceOrder]', flush=True); time.sleep(60)",
        ]
        systems.append(system)
        return system

    console, out = captured(width=80)
    with pytest.raises(MarkupError, match="PlaceOrder"):
        await asyncio.wait_for(
            run_system(infra, make_system, console, asyncio.Event(), print_line=broken_printer),
            30,
        )

    assert infra.calls == ["up", "down"]
    child = systems[0].procs["orders"].process
    assert child is not None
    assert child.returncode == -signal.SIGTERM  # stopped, not left behind
    assert out.getvalue().splitlines()[-3:] == [
        "stopping services",
        "stopping PostgreSQL and Kafka",
        "stopped",
    ]


async def test_a_failure_before_the_services_start_still_stops_the_infra(tmp_path: Path) -> None:
    infra = RecordingInfra()

    def make_system(endpoints: Endpoints) -> LocalSystem:
        raise RuntimeError("cannot create the databases")

    with pytest.raises(RuntimeError, match="databases"):
        await run_system(infra, make_system, captured()[0], asyncio.Event())
    assert infra.calls == ["up", "down"]


async def test_keep_infra_leaves_it_running(tmp_path: Path) -> None:
    infra = RecordingInfra()
    stop = asyncio.Event()
    stop.set()  # as if Ctrl-C came while the servers were starting
    await run_system(infra, lambda e: system_with(tmp_path), captured()[0], stop, keep_infra=True)
    assert infra.calls == ["up"]

"""``dtx``: run a service, the local infrastructure, and (later) the whole system.

Each sub-command lives with what it drives; this module only assembles them.
"""

from __future__ import annotations

import importlib
import sys

import typer

from dtx_infra.cli import infra_app
from dtx_runtime import ServiceDefinition, run_service

SERVICES = ("payments", "inventory", "orders", "coordinator", "saga", "notifications", "gateway")

DEFAULT_PATHS = ["local", "direct", "2pc", "saga"]

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)


def load_service(name: str) -> ServiceDefinition:  # type: ignore[type-arg]
    """The ``SERVICE`` definition of ``dtx_<name>.main``."""
    if name not in SERVICES:
        raise typer.BadParameter(f"unknown service {name!r}; choose one of {', '.join(SERVICES)}")
    module = importlib.import_module(f"dtx_{name}.main")
    definition: ServiceDefinition = module.SERVICE  # type: ignore[type-arg]
    return definition


@app.command()
def serve(service: str = typer.Argument(..., help=f"one of: {', '.join(SERVICES)}")) -> None:
    """Run one service in the foreground until SIGTERM or Ctrl-C."""
    sys.exit(run_service(load_service(service)))


@app.command()
def bench(
    concurrency: int = typer.Option(16, min=1, max=512, help="closed-loop workers per path"),
    seconds: float = typer.Option(10.0, min=1, max=600, help="measured time per phase"),
    path: list[str] = typer.Option(DEFAULT_PATHS, help="paths to measure, in order"),  # noqa: B008
    as_json: bool = typer.Option(False, "--json", help="print one machine-readable line"),
) -> None:
    """Orders/s and p50/p95/p99 of 2PC, saga and the baselines, on a fresh local system."""
    import asyncio
    import tempfile
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from dtx_cli.bench import run_bench, summary_rows
    from dtx_infra import LocalInfra

    console = Console(stderr=True)
    infra = LocalInfra()
    infra.up()
    log_dir = Path(tempfile.mkdtemp(prefix="dtx-bench-"))
    report = asyncio.run(
        run_bench(
            infra,
            log_dir,
            concurrency=concurrency,
            seconds=seconds,
            paths=tuple(path),
            progress=lambda line: console.print(f"[dim]{line}[/dim]"),
        )
    )
    if as_json:
        print(report.as_json())
        return
    table = Table(title=f"dtx bench: concurrency {concurrency}, {seconds:g} s per phase")
    for column in (
        "path",
        "peak/s",
        "x direct",
        "half rate/s",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "errors",
    ):
        table.add_column(column, justify="right")
    for row in summary_rows(report):
        table.add_row(*row)
    Console().print(table)
    Console().print(f"peak resident memory (MB): {report.peak_rss_mb}")


app.add_typer(infra_app, name="infra", help="Local PostgreSQL and Kafka: up, down, status.")

if __name__ == "__main__":
    app()

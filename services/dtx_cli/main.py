"""``dtx``: run a service, the local infrastructure, or the whole system; place orders, measure.

Each sub-command lives with what it drives; this module only assembles them.
"""

from __future__ import annotations

import sys

import typer

from dtx_cli.serve import SERVICES
from dtx_cli.txn import txn_app
from dtx_infra.cli import cluster_app, infra_app, toolchain_app
from dtx_infra.images_cli import images_app

# The local path last: its thousands of writes a second leave autovacuum and
# checkpoint work behind that would otherwise land in the next path's figures.
DEFAULT_PATHS = ["direct", "2pc", "saga", "local"]

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)


@app.command()
def serve(service: str = typer.Argument(..., help=f"one of: {', '.join(SERVICES)}")) -> None:
    """Run one service in the foreground until SIGTERM or Ctrl-C."""
    from dtx_cli.serve import main

    sys.exit(main([service]))


@app.command()
def bench(
    concurrency: int = typer.Option(16, min=1, max=512, help="closed-loop workers per path"),
    seconds: float = typer.Option(20.0, min=1, max=600, help="measured time per phase"),
    path: list[str] = typer.Option(DEFAULT_PATHS, help="paths to measure, in order"),  # noqa: B008
    as_json: bool = typer.Option(False, "--json", help="print one machine-readable line"),
) -> None:
    """Orders/s and p50/p95/p99 of 2PC, saga and the baselines, on a fresh local system."""
    import tempfile
    from pathlib import Path

    import uvloop
    from rich.console import Console
    from rich.table import Table

    from dtx_cli.bench import run_bench, summary_rows
    from dtx_infra import LocalInfra

    console = Console(stderr=True)
    infra = LocalInfra()
    infra.up()
    log_dir = Path(tempfile.mkdtemp(prefix="dtx-bench-"))
    # The load generator runs on the services' event loop too: it is part of the measurement.
    report = uvloop.run(
        run_bench(
            infra,
            log_dir,
            concurrency=concurrency,
            seconds=seconds,
            paths=tuple(path),
            # Plain text: a line may carry a user's --path, never to be read as markup.
            progress=lambda line: console.print(
                line, style="dim", markup=False, emoji=False, highlight=False
            ),
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
        "outbox backlog / oldest",
        "cpu busy / steal %",
        "empty gRPC call p50 / p99 ms",
        "empty PG query p50 / p99 ms",
    ):
        table.add_column(column, justify="right")
    for row in summary_rows(report):
        table.add_row(*row)
    out = Console()
    if not out.is_terminal:  # a file or a pipe: the whole table, not 80 columns of it
        out = Console(width=200)
    out.print(table)
    out.print(f"peak resident memory (MB): {report.peak_rss_mb}")


@app.command()
def up(
    demo: bool = typer.Option(False, help="run the demo once everything is up"),
    gateway_port: int = typer.Option(8080, min=1, max=65535, envvar="DTX_GATEWAY_PORT"),
    keep_infra: bool = typer.Option(False, help="leave PostgreSQL and Kafka running at exit"),
) -> None:
    """Run the whole system locally: infrastructure and every service, supervised."""
    import asyncio

    from rich.console import Console

    from dtx_cli.local import run_up

    async def then_demo(url: str, secret: str) -> None:
        from dtx_cli.demo import print_summary, run_demo

        console = Console()
        print_summary(await run_demo(url, secret, console=console), console)

    asyncio.run(
        run_up(
            gateway_port=gateway_port,
            keep_infra=keep_infra,
            after_start=then_demo if demo else None,
        )
    )


@app.command()
def demo(
    gateway: str = typer.Option("http://127.0.0.1:8080", envvar="DTX_GATEWAY_URL"),
    orders: int = typer.Option(40, min=1, max=10_000),
    secret: str | None = typer.Option(
        None, envvar="DTX_JWT_SECRET", help="defaults to the local one"
    ),
) -> None:
    """Accounts, products and a mix of 2PC and saga orders through the gateway, some failing."""
    import asyncio

    from rich.console import Console

    from dtx_cli.demo import print_summary, run_demo
    from dtx_cli.txn import _secret

    console = Console()
    print_summary(
        asyncio.run(run_demo(gateway, _secret(secret), orders=orders, console=console)), console
    )


@app.command()
def token(
    role: str = typer.Option(..., help="admin or customer"),
    sub: str | None = typer.Option(None, help="the account id, for a customer"),
    ttl: int = typer.Option(3600, min=1, max=7 * 86400, help="seconds"),
    secret: str | None = typer.Option(
        None, envvar="DTX_JWT_SECRET", help="defaults to the local one"
    ),
) -> None:
    """Mint a token for local use and print it."""
    from dtx_cli.txn import _secret
    from dtx_gateway.auth import mint_token

    if role not in ("admin", "customer"):
        raise typer.BadParameter("--role must be admin or customer")
    if role == "customer" and not sub:
        raise typer.BadParameter("--sub (the customer's account id) is required for a customer")
    print(mint_token(_secret(secret), role, sub or "admin", ttl))


app.add_typer(infra_app, name="infra", help="Local PostgreSQL and Kafka: up, down, status.")
app.add_typer(txn_app, name="txn")
app.add_typer(toolchain_app, name="toolchain")
app.add_typer(images_app, name="images")
app.add_typer(cluster_app, name="cluster")

if __name__ == "__main__":
    app()

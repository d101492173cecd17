"""``dtx infra up|down|status``: the local servers from a shell.

Every failure ends with exactly one ``error: ...`` line on stderr and exit code 1; any
multi-line context (a server log's tail) is printed before that line, so the last line a
developer or CI log shows always says what failed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from dtx_infra.errors import InfraError
from dtx_infra.local import LocalInfra

infra_app = typer.Typer(
    name="infra",
    help="Run dtx's local PostgreSQL and Kafka (state in .dtx/, or $DTX_STATE_DIR).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

T = TypeVar("T")
_out = Console(highlight=False, soft_wrap=True)

Timeout = Annotated[float, typer.Option("--timeout", min=1.0, help="Seconds to wait at most.")]


def _fail(summary: str, details: str | None = None) -> typer.Exit:
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    if details:
        err.print(details, markup=False, style="dim")
    err.print(f"error: {summary}", markup=False)
    return typer.Exit(1)


def _guard(action: Callable[[], T]) -> T:
    """Run ``action``; turn any failure into the one-line error and a non-zero exit."""
    # aiokafka logs connection attempts while a broker starts; without a handler Python's
    # last-resort handler would print them to stderr between our lines.
    logging.getLogger("aiokafka").addHandler(logging.NullHandler())
    try:
        return action()
    except InfraError as exc:
        raise _fail(exc.summary, exc.details) from None
    except KeyboardInterrupt:
        raise _fail("interrupted") from None
    except Exception as exc:
        raise _fail(f"unexpected {type(exc).__name__}: {' '.join(str(exc).split())}") from None


@infra_app.command()
def up(timeout: Timeout = 120.0) -> None:
    """Start PostgreSQL and Kafka (no-op if running) and print their endpoints."""
    infra = _guard(LocalInfra)
    eps = _guard(lambda: infra.up(timeout_s=timeout))
    _out.print(f"postgres  {eps.postgres_host}:{eps.postgres_port}  user={eps.postgres_user}")
    _out.print(f"kafka     {eps.kafka_bootstrap}")
    _out.print(f"state     {infra.state_dir}")
    _out.print("service DSNs:")
    for name, dsn in eps.service_dsns().items():  # plain lines: easy to copy or grep
        _out.print(f"  {name:<14} {dsn}")


@infra_app.command()
def down(timeout: Timeout = 30.0) -> None:
    """Stop the PostgreSQL and Kafka started from this state dir."""
    infra = _guard(LocalInfra)
    _guard(lambda: infra.down(timeout_s=timeout))
    _out.print(f"stopped (state kept in {infra.state_dir})")


@infra_app.command()
def status() -> None:
    """Show whether each server runs, with its PID and port."""
    infra = _guard(LocalInfra)
    st = _guard(infra.status)
    table = Table("component", "state", "pid", "port", title=f"dtx infra ({st.state_dir})")
    for comp in st.components:
        state = "[green]running[/green]" if comp.running else "[dim]stopped[/dim]"
        table.add_row(comp.name, state, str(comp.pid or "-"), str(comp.port))
    _out.print(table)


toolchain_app = typer.Typer(
    name="toolchain",
    help="Build the Go tools the tests and the local cluster use (cached in ~/.cache/dtx).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@toolchain_app.command("build")
def toolchain_build(
    groups: Annotated[
        list[str] | None, typer.Argument(help="Tool groups to build (default: every one).")
    ] = None,
    servers: Annotated[
        bool,
        typer.Option(
            help="Also install the Debian packages (PostgreSQL, containerd, buildah, ...) "
            "and resolve the Kafka broker's jars."
        ),
    ] = True,
) -> None:
    """Build every tool once (each group keyed by version), then provision the servers.

    What `make tools` runs before the tests: nothing is compiled or fetched under a test's
    timeout afterwards. Progress goes to stderr, one line per start and end, and a heartbeat
    once a minute while a long build runs.
    """
    from dtx_infra import debian, toolchain
    from dtx_infra.kafka_jars import ensure_kafka_jars
    from dtx_infra.pg_binaries import ensure_pg_binaries
    from dtx_infra.settings import InfraSettings

    if servers:
        started = time.monotonic()
        installed = _guard(lambda: debian.install(debian.CLUSTER_PACKAGES))
        if installed:
            toolchain.say(f"installed from Debian: {' '.join(installed)}")
        pg = _guard(ensure_pg_binaries)
        cache = _guard(InfraSettings.resolve).cache_dir
        _guard(lambda: ensure_kafka_jars(cache))
        toolchain.say(
            f"PostgreSQL {pg.version} and Kafka's jars ready in "
            f"{toolchain.fmt_duration(time.monotonic() - started)}"
        )
    _guard(lambda: toolchain.build(groups or ()))


@toolchain_app.command("status")
def toolchain_status() -> None:
    """Show each tool group: version, built or not, and where."""
    from dtx_infra import toolchain

    table = Table("group", "version", "state", "binaries", "directory", title="dtx toolchain")
    for g, built in _guard(toolchain.status):
        state = "[green]built[/green]" if built else "[red]missing[/red]"
        table.add_row(g.name, g.version(), state, " ".join(g.binaries), str(g.bin_dir()))
    _out.print(table)


cluster_app = typer.Typer(
    name="cluster",
    help="One real Kubernetes node on this machine (state in .dtx/cluster, or $DTX_CLUSTER_DIR).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@cluster_app.command("up")
def cluster_up(timeout: Timeout = 240.0) -> None:
    """Start containerd, the control plane, kubelet, kube-proxy and CoreDNS (no-op if up)."""
    from dtx_infra.cluster import Cluster

    cluster = Cluster()
    started = time.monotonic()
    _guard(lambda: cluster.up(timeout_s=timeout))
    _out.print(f"cluster up in {time.monotonic() - started:.0f}s; nodes Ready, CoreDNS Ready")
    _out.print(f"kubeconfig  {cluster.kubeconfig}")
    _out.print(f"server      {cluster.server}")


@cluster_app.command("down")
def cluster_down(timeout: Timeout = 120.0) -> None:
    """Stop every component and remove its mounts, namespaces, bridges and iptables rules."""
    from dtx_infra.cluster import Cluster

    cluster = Cluster()
    _guard(lambda: cluster.down(timeout_s=timeout))
    _out.print(f"cluster down (state kept in {cluster.state_dir})")


@cluster_app.command("status")
def cluster_status() -> None:
    """Each component's state and PID, and the kubeconfig path."""
    from dtx_infra.cluster import Cluster

    cluster = Cluster()
    table = Table("component", "state", "pid", "log", title=f"dtx cluster ({cluster.state_dir})")
    for comp in _guard(cluster.components):
        state = "[green]running[/green]" if comp.running else "[dim]stopped[/dim]"
        table.add_row(comp.name, state, str(comp.pid or "-"), str(comp.log))
    _out.print(table)
    _out.print(f"kubeconfig  {cluster.kubeconfig}")

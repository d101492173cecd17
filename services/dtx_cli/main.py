"""``dtx``: run a service, the local infrastructure, and (later) the whole system.

Each sub-command lives with what it drives; this module only assembles them.
"""

from __future__ import annotations

import importlib
import sys

import typer

from dtx_runtime import ServiceDefinition, run_service

SERVICES = ("payments", "inventory", "orders", "coordinator", "saga", "notifications", "gateway")

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


def _mount_optional() -> None:
    try:
        from dtx_infra.cli import infra_app
    except ImportError:  # pragma: no cover - during bootstrap only
        return
    app.add_typer(infra_app, name="infra", help="Local PostgreSQL and Kafka.")


_mount_optional()

if __name__ == "__main__":
    app()

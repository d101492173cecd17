"""Run one service: ``python -m dtx_cli.serve <name>`` (what ``dtx serve <name>`` does).

Kept free of the command line's heavier imports (typer, rich, the gateway's
JWT stack), so a service process starts fast: restarts after a crash, and
every test that starts processes, wait on this.
"""

from __future__ import annotations

import importlib
import sys

from dtx_runtime import ServiceDefinition, run_service

SERVICES = ("payments", "inventory", "orders", "coordinator", "saga", "notifications", "gateway")


def load_service(name: str) -> ServiceDefinition:  # type: ignore[type-arg]
    """The ``SERVICE`` definition of ``dtx_<name>.main``."""
    if name not in SERVICES:
        raise ValueError(f"unknown service {name!r}; choose one of {', '.join(SERVICES)}")
    module = importlib.import_module(f"dtx_{name}.main")
    definition: ServiceDefinition = module.SERVICE  # type: ignore[type-arg]
    return definition


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(f"usage: python -m dtx_cli.serve <{'|'.join(SERVICES)}>", file=sys.stderr)
        return 2
    try:
        definition = load_service(argv[0])
    except ValueError as exc:
        print(f"dtx serve: {exc}", file=sys.stderr)
        return 2
    return run_service(definition)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

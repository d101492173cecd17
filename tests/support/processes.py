"""Service processes for tests: the same supervisor ``dtx up`` uses."""

from dtx_cli.processes import ServiceProcess, free_port

__all__ = ["ServiceProcess", "free_port"]

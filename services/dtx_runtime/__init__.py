"""The one runtime every dtx service stands on.

A service module declares a :class:`ServiceDefinition` (its name, settings,
migrations and a ``setup`` coroutine that registers its gRPC servicers); the
runtime does the rest the same way everywhere: settings validation, JSON logs,
tracing, the database pool and migrations, the gRPC server with health and
reflection, the HTTP side port with ``/metrics``, ``/healthz`` and ``/readyz``,
and a graceful shutdown on SIGTERM.
"""

from dtx_runtime.errors import ConfigError, DtxError, MigrationError, StartupError
from dtx_runtime.service import ServiceContext, ServiceDefinition, run_service, serve
from dtx_runtime.settings import ServiceSettings, load_settings

__all__ = [
    "ConfigError",
    "DtxError",
    "MigrationError",
    "ServiceContext",
    "ServiceDefinition",
    "ServiceSettings",
    "StartupError",
    "load_settings",
    "run_service",
    "serve",
]

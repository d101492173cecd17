"""Every error the runtime raises on purpose, in one place.

Each carries a message meant for a person: the command line prints it as one
line and exits non-zero, rather than showing a traceback.
"""


class DtxError(Exception):
    """Base of the errors dtx raises on purpose."""


class ConfigError(DtxError):
    """A setting is missing or malformed; the message names the variable."""


class MigrationError(DtxError):
    """The migrations on disk and the ones recorded in the database disagree."""


class StartupError(DtxError):
    """A dependency (database, Kafka, a port) was not usable in time."""
